//! frame. PLACEHOLDER
