fn main() {
    println!("{}", greet::greeting("rsnap"));
}
