fn main() {
    println!("dlrm {}", env!("CARGO_PKG_VERSION"));
}
