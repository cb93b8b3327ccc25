fn main() {
    let items = hx_model::inventory();
    println!("{}", hx_text::greeting("rsnap"));
    println!("{} items need {} crates", items.len(), hx_engine::crates_needed(&items));
}
