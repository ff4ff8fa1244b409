//! Octolog's gRPC API: the protobuf messages and the tonic client and server, generated at build
//! time from `octolog/v1/octolog.proto` (in this crate's folder) with a vendored `protoc`.
//!
//! The `.proto` file is the reference for clients in other languages, and its comments are the
//! documentation of every message, field and call; they are copied onto the generated items here.
//!
//! - Messages: `v1::FetchRequest`, `v1::Record`, ...; oneofs live in a module named after their
//!   message, such as `v1::offset_query::Position`.
//! - Server: implement `v1::octolog_server::Octolog` and serve it wrapped in
//!   `v1::octolog_server::OctologServer`.
//! - Client: `v1::octolog_client::OctologClient`.
//!
//! Every protobuf `bytes` field is a `bytes::Bytes`, so record data moves between the network
//! and the log without copies. These types are the wire format only: per the workspace's crate
//! boundaries, they do not travel past the broker's service layer and the client crate.

/// Version 1 of the API: protobuf package `octolog.v1`.
pub mod v1 {
    tonic::include_proto!("octolog.v1");
}

/// The encoded `google.protobuf.FileDescriptorSet` of `octolog/v1/octolog.proto`, for gRPC server
/// reflection and for tools that need the schema at run time.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("octolog_descriptor");

#[cfg(test)]
mod tests {
    use super::v1;
    use bytes::Bytes;
    use prost::Message;

    /// A fetch response survives encoding and decoding, with record data as `Bytes`.
    #[test]
    fn fetch_response_round_trips() {
        let response = v1::FetchResponse {
            partitions: vec![v1::PartitionData {
                partition: 3,
                high_watermark: 42,
                log_start_offset: 7,
                batches: Bytes::from_static(b"\x00\x01batch bytes"),
                records: vec![v1::Record {
                    offset: 41,
                    timestamp_ms: Some(1_700_000_000_000),
                    key: None,
                    value: Some(Bytes::from_static(b"")),
                    headers: vec![v1::RecordHeader {
                        key: "trace".to_owned(),
                        value: None,
                    }],
                }],
                error_code: v1::ErrorCode::OffsetOutOfRange as i32,
                error_message: "offset 3 is below the log start offset 7".to_owned(),
            }],
        };

        let encoded = Bytes::from(response.encode_to_vec());
        let decoded = v1::FetchResponse::decode(encoded).expect("decodes what it encoded");
        assert_eq!(decoded, response);

        let data = &decoded.partitions[0];
        // The type annotation is the check: `batches` must be `Bytes`, not `Vec<u8>`.
        let batches: &Bytes = &data.batches;
        assert_eq!(&batches[..], b"\x00\x01batch bytes");
        // A null key and an empty value stay distinct after the round trip.
        assert_eq!(data.records[0].key, None);
        assert_eq!(data.records[0].value.as_deref(), Some(&b""[..]));
        assert_eq!(data.error_code(), v1::ErrorCode::OffsetOutOfRange);
    }

    /// The oneof of an offset query round-trips with the variant it was given.
    #[test]
    fn offset_query_position_round_trips() {
        use v1::offset_query::Position;
        for position in [
            Position::Earliest(v1::Earliest {}),
            Position::Latest(v1::Latest {}),
            Position::TimestampMs(-1),
        ] {
            let query = v1::OffsetQuery {
                partition: 1,
                position: Some(position),
            };
            let decoded = v1::OffsetQuery::decode(query.encode_to_vec().as_slice())
                .expect("decodes what it encoded");
            assert_eq!(decoded, query);
        }
    }

    /// Both generated sides exist with the names the broker and the client crate use.
    #[test]
    fn service_types_are_nameable() {
        use tonic::server::NamedService;
        use v1::octolog_client::OctologClient;
        use v1::octolog_server::{Octolog, OctologServer};

        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<OctologClient<tonic::transport::Channel>>();

        // Type-checked though never called: the server trait exists and wraps any implementation.
        #[allow(dead_code)]
        fn wrap<S: Octolog>(service: S) -> OctologServer<S> {
            OctologServer::new(service)
        }

        // Clients of every language route calls by this name.
        assert_eq!(
            <OctologServer<()> as NamedService>::NAME,
            "octolog.v1.Octolog"
        );
        assert!(!super::FILE_DESCRIPTOR_SET.is_empty());
    }
}
