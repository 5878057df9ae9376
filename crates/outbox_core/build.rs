//! Generates the gRPC client and message types of Centrifugo's server API from
//! `proto/centrifugo/api.proto` (see proto/centrifugo/README.md), when the `grpc` feature is on.

fn main() {
    println!("cargo:rerun-if-changed=proto/centrifugo/api.proto");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "grpc")]
    grpc::generate();
}

#[cfg(feature = "grpc")]
mod grpc {
    /// Request fields that carry JSON as raw bytes (Centrifugo's `Raw` type): over HTTP they are
    /// JSON values written in place, over gRPC those values' text as bytes.
    const RAW_JSON_FIELDS: &[&str] = &[
        "PublishRequest.data",
        "BroadcastRequest.data",
        "SubscribeRequest.info",
        "SubscribeRequest.data",
        "RefreshRequest.info",
    ];

    /// The request messages an outbox command can hold, and the messages inside them: these
    /// are read from a command's JSON payload as Centrifugo's HTTP API reads them.
    const FROM_JSON: &[&str] = &[
        "PublishRequest",
        "BroadcastRequest",
        "SubscribeRequest",
        "UnsubscribeRequest",
        "DisconnectRequest",
        "RefreshRequest",
        "HistoryRemoveRequest",
        "Disconnect",
        "StreamPosition",
        "SubscribeOptionOverride",
        "BoolValue",
        "FilterNode",
    ];

    pub fn generate() {
        let package = ".centrifugal.centrifugo.api";
        let descriptors =
            protox::compile(["proto/centrifugo/api.proto"], ["proto"]).expect("proto/centrifugo/api.proto compiles");
        let mut config = tonic_prost_build::configure().build_server(false).build_transport(false);
        // A Command (and a Reply) has a field for every one of ~40 methods: inline, each message
        // is kilobytes, made, moved and dropped per command; boxed, it is a few hundred bytes.
        for message in ["Command", "Reply"] {
            config = config.boxed(format!("{package}.{message}"));
        }
        for message in FROM_JSON {
            config = config
                .type_attribute(format!("{package}.{message}"), "#[derive(serde::Deserialize)] #[serde(default)]");
            // A command's own message refuses an unknown or repeated key, so a payload whose keys
            // already read as Go reads them is read in one pass (crate::grpc::command).
            if message.ends_with("Request") {
                config = config.type_attribute(format!("{package}.{message}"), "#[serde(deny_unknown_fields)]");
            }
        }
        // Every field of those messages: a JSON null is the field's zero value (as Go reads it),
        // except raw JSON fields, whose text (even `null`) is kept.
        // The field names of each of those messages, for reading JSON keys as Go does.
        let mut fields = String::from(
            "/// The JSON field names of the request messages.\npub const FIELDS: &[(&str, &[&str])] = &[\n",
        );
        for message in descriptors.file.iter().flat_map(|f| f.message_type.iter()) {
            let name = message.name();
            if !FROM_JSON.contains(&name) {
                continue;
            }
            let names: Vec<String> = message.field.iter().map(|f| format!("{:?}", f.name())).collect();
            fields.push_str(&format!("    ({name:?}, &[{}]),\n", names.join(", ")));
            for field in &message.field {
                let path = format!("{package}.{name}.{}", field.name());
                let repeated = field.label() == prost_types::field_descriptor_proto::Label::Repeated;
                let is_map = repeated && field.type_name().ends_with("Entry");
                let with = if RAW_JSON_FIELDS.contains(&format!("{name}.{}", field.name()).as_str()) {
                    "crate::grpc::raw_json"
                } else if is_map {
                    "crate::grpc::string_map"
                } else if repeated && field.r#type() == prost_types::field_descriptor_proto::Type::String {
                    "crate::grpc::strings"
                } else {
                    "crate::grpc::null_as_default"
                };
                config = config.field_attribute(path, format!("#[serde(deserialize_with = \"{with}\")]"));
            }
        }
        fields.push_str("];\n");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        std::fs::write(out.join("request_fields.rs"), fields).expect("writing request_fields.rs");
        config.compile_fds(descriptors).expect("generating the gRPC client");
    }
}
