//! The data model: a tiny inventory.

pub struct Item {
    pub name: &'static str,
    pub count: u32,
}

pub fn inventory() -> Vec<Item> {
    vec![Item { name: "bolts", count: 12 }, Item { name: "nuts", count: 30 }]
}
