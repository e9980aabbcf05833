//! `kubenft-burst`: many new flows from one process, counted by answering server; see
//! [`kubenft_lab::burst`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kubenft_lab::burst::main()
}
