//! JSON codec. PLACEHOLDER: being written.
