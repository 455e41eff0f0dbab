//! tokio codec. PLACEHOLDER
