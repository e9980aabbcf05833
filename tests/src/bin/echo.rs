//! `kubenft-echo`: the lab's echo server and probe client; see [`kubenft_lab::echo`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kubenft_lab::echo::main()
}
