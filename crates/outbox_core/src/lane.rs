//! How many commands the next batch of one ordered lane (an outbox partition, a Kafka partition)
//! may carry, after what became of the batches before it.
//!
//! Two rules, both about failures:
//! - **Resend apart.** Centrifugo runs every command of a batch, so when one fails temporarily
//!   while the ones after it run, those have overtaken it. Resending it inside a full batch of
//!   newer commands would let them overtake it too when it fails again. So from then on, through
//!   the last position of that batch, commands go one per request until all of them are
//!   settled; then batches are full again. A command therefore only ever runs after commands of
//!   its own first batch.
//! - **Halve what times out.** A batch that timed out is resent with half as many commands
//!   (down to one); each answered batch doubles the size back, up to the configured limit.
//!
//! Positions are whatever orders the lane: outbox row ids, Kafka offsets.

use crate::dispatch::{FailureKind, Outcome};

/// The batch-size state of one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchWindow {
    /// From and through these positions commands go one per request (a command of that batch
    /// failed temporarily while others ran).
    resend: Option<(i64, i64)>,
    /// Commands per batch after timeouts (None: the configured limit).
    timeout_cap: Option<usize>,
}

impl BatchWindow {
    /// A lane's window, resuming a resend that a restart interrupted (see [`Self::resend`]).
    pub fn resuming(resend: Option<(i64, i64)>) -> Self {
        BatchWindow { resend, timeout_cap: None }
    }

    /// From and through which positions commands are resent one per request, if they are: kept
    /// where a restarted worker finds it.
    pub fn resend(&self) -> Option<(i64, i64)> {
        self.resend
    }

    /// Through which position commands are resent one per request, if they are.
    #[cfg(test)]
    pub fn resend_through(&self) -> Option<i64> {
        self.resend.map(|(_, through)| through)
    }

    /// The most commands the batch starting at `first_position` may carry, `configured` being
    /// the lane's own limit. A first position past the resend ends it. One before it (rows a
    /// rolled-back round or a restart brings again, positions that started again) goes in a
    /// batch that stops before the resend (see [`Self::stop_before`]), which stays.
    pub fn limit(&mut self, configured: usize, first_position: i64) -> usize {
        if self.resend.is_some_and(|(_, through)| first_position > through) {
            self.resend = None;
        }
        self.peek_limit(configured, first_position)
    }

    /// [`Self::limit`] without ending a resend: what a batch made ahead of the answer before it
    /// may carry (that answer may still widen the resend, so only sending may end it).
    pub fn peek_limit(&self, configured: usize, first_position: i64) -> usize {
        match self.resend {
            Some((from, through)) if first_position > through || first_position < from => {
                BatchWindow { resend: None, ..self.clone() }.limit_now(configured)
            }
            _ => self.limit_now(configured),
        }
    }

    /// The position a batch starting at `first_position` stops before: the start of a resend
    /// ahead of it (what came before it ran in full batches; the resend goes one by one).
    pub fn stop_before(&self, first_position: i64) -> Option<i64> {
        self.resend.map(|(from, _)| from).filter(|&from| first_position < from)
    }

    /// [`Self::limit`] without a position: what the next batch may carry as things stand.
    pub fn limit_now(&self, configured: usize) -> usize {
        let configured = configured.max(1);
        if self.resend.is_some() {
            return 1;
        }
        self.timeout_cap.map_or(configured, |cap| cap.clamp(1, configured))
    }

    /// The limit in force when it is below `configured` (for the status views).
    pub fn reduced(&self, configured: usize) -> Option<usize> {
        let now = self.limit_now(configured);
        (now < configured.max(1)).then_some(now)
    }

    /// Takes what became of a batch whose commands' outcomes are `outcomes` (in order; `None`
    /// for commands not sent) and whose positions run from `first_position` to `last_position`.
    pub fn record<'a>(
        &mut self,
        outcomes: impl IntoIterator<Item = Option<&'a Outcome>>,
        first_position: i64,
        last_position: i64,
    ) {
        let (mut sent, mut retried, mut timed_out, mut answered) = (0usize, 0usize, 0usize, false);
        for outcome in outcomes.into_iter().flatten() {
            sent += 1;
            if let Outcome::Retry(failure) = outcome {
                if failure.is_deferred() {
                    // Not sent (no time left for a one-by-one resend): it has not run, and
                    // its first batch is still to come.
                    sent -= 1;
                    continue;
                }
                retried += 1;
                timed_out += usize::from(failure.is_timeout());
                answered |= failure.kind == FailureKind::Centrifugo;
            }
        }
        if sent == 0 {
            return;
        }
        if retried == 0 {
            // Answered in full: grow back towards the configured size.
            self.timeout_cap = self.timeout_cap.and_then(|cap| cap.checked_mul(2));
            return;
        }
        if timed_out == sent {
            // No answer at all: the same batch would only time out again.
            self.timeout_cap = Some((sent / 2).max(1));
            return;
        }
        if retried < sent || answered {
            // Centrifugo ran the batch and failed some of it (perhaps all, perhaps a batch of
            // one): a full batch with newer commands could fail them again while the newer
            // ones run, so resend apart through this batch.
            self.resend = Some(match self.resend {
                // A batch far below the resend (positions started again) starts a resend of its
                // own: joined, the two would send everything between them one by one.
                Some((from, through)) if last_position < from && from - last_position > through - from + 1 => {
                    (first_position, last_position)
                }
                Some((from, through)) => (from.min(first_position), through.max(last_position)),
                None => (first_position, last_position),
            });
        }
        // Every command refused alike by the request (a node down, a 5xx, a refused key):
        // nothing ran, so the same batch resent keeps the order.
    }

    /// The lane has nothing left to send: no resend is under way.
    pub fn drained(&mut self) {
        self.resend = None;
    }

    /// Forgets everything (the lane was drained, or is about another table now).
    pub fn reset(&mut self) {
        *self = BatchWindow::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Failure;

    fn retry(message: &str) -> Outcome {
        Outcome::Retry(Failure::centrifugo(100, message))
    }

    fn timeout() -> Outcome {
        Outcome::Retry(Failure::http(None, "timeout"))
    }

    #[test]
    fn a_partial_failure_resends_its_batch_one_by_one_then_batches_again() {
        let mut w = BatchWindow::default();
        assert_eq!(w.limit(100, 1), 100);
        // Rows 1..=10: row 3 failed, the rest ran.
        let outcomes: Vec<Outcome> =
            (1..=10).map(|i| if i == 3 { retry("internal") } else { Outcome::Delivered }).collect();
        w.record(outcomes.iter().map(Some), 1, 10);
        assert_eq!(w.resend_through(), Some(10));
        // Row 3 goes alone, and fails again: still alone, and nothing newer joins it.
        assert_eq!(w.limit(100, 3), 1);
        w.record([Some(&retry("internal"))], 3, 3);
        assert_eq!(w.limit(100, 3), 1);
        w.record([Some(&Outcome::Delivered)], 3, 3);
        // The next row is newer than the batch: full batches again.
        assert_eq!(w.limit(100, 11), 100);
        assert_eq!(w.resend_through(), None);
        assert_eq!(w.reduced(100), None);
    }

    #[test]
    fn a_second_partial_failure_inside_a_resend_extends_it_only_as_far_as_its_batch() {
        let mut w = BatchWindow::resuming(Some((1, 10)));
        w.record([Some(&retry("x"))], 4, 4);
        assert_eq!(w.resend_through(), Some(10), "a resend's one command never widens it");
        // Found by the e2e test: a batch of one that Centrifugo failed is resent alone too
        // (before, it went out again at the head of a full batch).
        let mut w = BatchWindow::default();
        w.record([Some(&retry("x"))], 3, 3);
        assert_eq!((w.resend_through(), w.limit(100, 3)), (Some(3), 1));
        assert_eq!(w.limit(100, 4), 100);
        let mut w = BatchWindow::default();
        w.record([Some(&retry("x")), Some(&retry("y"))], 7, 8);
        assert_eq!(w.resend_through(), Some(8), "every command failed by Centrifugo itself");
        let mut w = BatchWindow::default();
        w.record([Some(&retry("x")), Some(&Outcome::Delivered)], 19, 20);
        w.record([Some(&retry("x")), Some(&Outcome::Delivered)], 29, 30);
        assert_eq!(w.resend_through(), Some(30));
    }

    #[test]
    fn a_batch_refused_as_a_whole_is_resent_as_it_was() {
        let mut w = BatchWindow::default();
        let refused = Outcome::Retry(Failure::http(Some(503), "unavailable"));
        w.record([Some(&refused), Some(&refused)], 1, 2);
        assert_eq!(w, BatchWindow::default());
        // Commands not sent (malformed, known already) do not count.
        w.record([None, None], 1, 2);
        assert_eq!(w, BatchWindow::default());
    }

    #[test]
    fn a_batch_that_keeps_timing_out_is_halved_down_to_one_then_grows_back() {
        let mut w = BatchWindow::default();
        let mut size = 1000;
        let mut sizes = vec![];
        while size > 1 {
            let outcomes = vec![timeout(); size];
            w.record(outcomes.iter().map(Some), 1, size as i64);
            size = w.limit(1000, 1);
            sizes.push(size);
        }
        assert_eq!(sizes, [500, 250, 125, 62, 31, 15, 7, 3, 1]);
        assert_eq!(w.reduced(1000), Some(1));
        // A lone command that times out stays alone.
        w.record([Some(&timeout())], 1, 1);
        assert_eq!(w.limit(1000, 1), 1);
        let mut grown = vec![];
        for _ in 0..11 {
            w.record([Some(&Outcome::Delivered)], 1, 1);
            grown.push(w.limit(1000, 1));
        }
        assert_eq!(grown, [2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000]);
        assert_eq!(w.reduced(1000), None);
        // A timeout prefixed by the node that timed out (several endpoints) is one too.
        let labelled = Outcome::Retry(Failure::http(None, "2 endpoints tried, last http://b/api: timeout"));
        w.record([Some(&labelled), Some(&labelled)], 1, 2);
        assert_eq!(w.limit(1000, 1), 1);
    }

    /// Found by review: positions that start again (a truncated table, a recreated topic) left
    /// a resend that never ended; commands not sent yet started one. Found by the e2e test: a
    /// batch starting below the resend (rows a restart read again) ended it, so the failed
    /// command went out again in a full batch; now such a batch stops before the resend.
    #[test]
    fn a_resend_ends_past_its_end_and_rows_before_it_stop_short_of_it() {
        let mut w = BatchWindow::default();
        w.record([Some(&Outcome::Delivered), Some(&retry("x"))], 500, 520);
        assert_eq!(w.resend(), Some((500, 520)));
        assert_eq!((w.limit(100, 510), w.stop_before(510)), (1, None));
        assert_eq!((w.limit(100, 1), w.stop_before(1)), (100, Some(500)), "ids before the resend");
        assert_eq!(w.resend(), Some((500, 520)), "kept for when the positions reach it");
        assert_eq!(w.limit(100, 500), 1);
        assert_eq!((w.limit(100, 521), w.resend()), (100, None));
        let not_sent = Outcome::Retry(Failure::http(None, crate::dispatch::NOT_SENT_YET));
        w.record([Some(&Outcome::Delivered), Some(&not_sent), Some(&not_sent)], 1, 3);
        assert_eq!(w.resend(), None);
    }

    /// Found by review: a resend left over from before the positions started again, joined
    /// with a failure among the new positions, sent everything between them one by one.
    #[test]
    fn a_failure_far_below_a_resend_starts_its_own_and_one_just_below_joins_it() {
        let mut w = BatchWindow::resuming(Some((1_000_000, 1_000_099)));
        w.record([Some(&retry("x")), Some(&Outcome::Delivered)], 1, 100);
        assert_eq!(w.resend(), Some((1, 100)));
        assert_eq!(w.limit(100, 101), 100);
        // Rows a restarted worker reads again just below the resend it resumed.
        let mut w = BatchWindow::resuming(Some((60, 95)));
        w.record([Some(&retry("x")), Some(&Outcome::Delivered)], 50, 58);
        assert_eq!(w.resend(), Some((50, 95)));
    }

    #[test]
    fn the_configured_limit_bounds_everything() {
        let mut w = BatchWindow::default();
        assert_eq!(w.limit(0, 1), 1);
        w.record([Some(&timeout()), Some(&timeout()), Some(&timeout()), Some(&timeout())], 1, 4);
        assert_eq!(w.limit(1, 1), 1);
        assert_eq!(w.limit(10, 1), 2);
    }
}
