//! `xcp cert dev DIR`: a development CA, a server and a client certificate, so that tls:// and
//! quic:// can be tried in one command.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use xcp::transport::tls::write_dev_set;

use crate::{EXIT_OK, EXIT_USAGE};

const DEV_AFTER_HELP: &str = "\
What it writes (keys with mode 0600):
  DIR/ca.pem, DIR/ca.key          a development CA (keep ca.key private, or delete it)
  DIR/server.pem, DIR/server.key  a server certificate for localhost, 127.0.0.1, ::1 and --name
  DIR/client.pem, DIR/client.key  a client certificate
Both sides trust ca.pem; each presents its own certificate (mutual authentication). Not for
production: anyone holding ca.key can make certificates both sides accept.

Then:
  xcp serve --listen tls://127.0.0.1:7443 --cert DIR/server.pem --key DIR/server.key --ca DIR/ca.pem
  xcp ping tls://127.0.0.1:7443 --cert DIR/client.pem --key DIR/client.key --ca DIR/ca.pem
  (quic:// the same way; a server may listen on tls:// and quic:// with the same files)

Exit code: 0 when every file was written; 2 otherwise (the message says which file).";

/// Arguments of `xcp cert`.
#[derive(Args, Debug)]
pub struct CertArgs {
    #[command(subcommand)]
    pub command: CertCommand,
}

/// The subcommands of `xcp cert`.
#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Write a development CA, a server and a client certificate into DIR.
    #[command(after_help = DEV_AFTER_HELP)]
    Dev(DevArgs),
}

/// Arguments of `xcp cert dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// The directory to write into (created if missing; existing files are replaced).
    pub dir: PathBuf,

    /// More names (DNS names or IP addresses) the server certificate is valid for, besides
    /// localhost, 127.0.0.1 and ::1. Repeat for several.
    #[arg(long, value_name = "NAME")]
    pub name: Vec<String>,

    /// How many days the certificates are valid.
    #[arg(long, value_name = "DAYS", default_value_t = 365)]
    pub days: u32,
}

/// Runs `xcp cert`; returns the exit code.
pub fn run(args: CertArgs) -> u8 {
    match args.command {
        CertCommand::Dev(a) => match write_dev_set(&a.dir, &a.name, a.days) {
            Ok(set) => {
                println!(
                    "wrote a development CA and certificates, valid {} days:",
                    a.days
                );
                println!("  CA      {}", set.ca.display());
                println!(
                    "  server  {} {}",
                    set.server.0.display(),
                    set.server.1.display()
                );
                println!(
                    "  client  {} {}",
                    set.client.0.display(),
                    set.client.1.display()
                );
                println!("try:");
                println!(
                    "  xcp serve --listen tls://127.0.0.1:7443 --cert {} --key {} --ca {}",
                    set.server.0.display(),
                    set.server.1.display(),
                    set.ca.display()
                );
                println!(
                    "  xcp ping tls://127.0.0.1:7443 --cert {} --key {} --ca {}",
                    set.client.0.display(),
                    set.client.1.display(),
                    set.ca.display()
                );
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
        },
    }
}
