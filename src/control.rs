//! Control message bodies (SPEC §4, §6). PLACEHOLDER: being written.
