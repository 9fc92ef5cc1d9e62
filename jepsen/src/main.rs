//! raftpg-jepsen: fault injection with history checkers. Skeleton only; issue 6 builds it.
fn main() {
    eprintln!("raftpg-jepsen: not built yet (issue 6)");
    std::process::exit(2);
}
