//! `kubenft-flood`: hostile clients of one server port (idle connections, garbage, big
//! messages, slowloris, unread answers); see [`kubenft_lab::flood`].
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    kubenft_lab::flood::main()
}
