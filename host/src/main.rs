//! The `selma` command: a thin shell over the `selma` library.
fn main() -> std::process::ExitCode {
    selma::tuning::apply();
    selma::cli::main()
}
