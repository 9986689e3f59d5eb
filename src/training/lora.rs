//! LoRA adapters (not yet implemented).
