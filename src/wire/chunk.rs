//! Chunking. PLACEHOLDER
