//! Computes over the model.
use hx_model::Item;

/// Items per crate when packing.
pub const PACK_SIZE: u32 = 4;

pub fn crates_needed(items: &[Item]) -> u32 {
    items.iter().map(|i| i.count.div_ceil(PACK_SIZE)).sum()
}
