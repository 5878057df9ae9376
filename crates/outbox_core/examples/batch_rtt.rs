use std::time::{Duration, Instant};
use outbox_core::client::{CentrifugoClient, ClientConfig};
use outbox_core::dispatch::prepare_text;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, key, n, reps) = (args[1].clone(), args[2].clone(), args[3].parse::<usize>().unwrap(), args[4].parse::<usize>().unwrap());
    let client = CentrifugoClient::new(ClientConfig { api_url: url, api_key: key, connect_timeout: Duration::from_secs(1), timeout: Duration::from_secs(5), ..Default::default() }).unwrap();
    let mut i = 0u64;
    let mut total = Duration::ZERO;
    for _ in 0..reps {
        let cmds: Vec<_> = (0..n).map(|_| { i += 1; prepare_text("publish", &format!(r#"{{"channel": "chat:bench0", "data": {{"i": {i}, "text": "benchmark message"}}}}"#), || format!("cfo-abcdef0123456789-16384-{i}")).unwrap() }).collect();
        let t = Instant::now();
        let mut b = 0;
        let o = client.send(&cmds, &mut b);
        total += t.elapsed();
        assert!(o.iter().all(|o| *o == outbox_core::dispatch::Outcome::Delivered));
    }
    println!("n={n} avg {:?} per request", total / reps as u32);
}
