//! PROTOBUF codec. PLACEHOLDER: being written.
