//! `xcp schema`: the schema registry from the command line (SPEC §8), and the `--accepts` /
//! `--registry` options of `xcp serve`.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use xcp::control::KindRange;
use xcp::schema::{AdapterGraph, Registry, Schema};
use xcp::Ether;

use crate::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
The registry is a directory whose index.json lists
  {\"schemas\": [{\"namespace\", \"kind\", \"major\", \"minor\", \"file\"}]}
and each file a JSON Schema (draft 2020-12) of an Ether's payload. Without --registry the
built-in one is used: the standard kinds text, tokens, embedding, image (v1) and embedding v2.
hash128 is the first 16 bytes of SHA-256 over the schema's RFC 8785 canonical JSON.

Exit codes: 0 ok; 1 `check`: the Ether fails its schema, `convert`: no adapter path;
2 bad arguments or unreadable input.

Examples:
  xcp schema list
  xcp schema show embedding@2
  xcp schema check ether.json           # or - for stdin
  xcp schema convert ether.json --to 2  # embedding v1 -> v2, lineage recorded
  xcp serve --listen tcp://127.0.0.1:7070 --accepts text@1,embedding@2";

/// Arguments of `xcp schema`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct SchemaArgs {
    /// The registry directory (with its index.json); default: the built-in standard kinds.
    #[arg(long, value_name = "DIR", global = true)]
    pub registry: Option<PathBuf>,

    #[command(subcommand)]
    pub command: SchemaCommand,
}

/// The subcommands of `xcp schema`.
#[derive(Subcommand, Debug)]
pub enum SchemaCommand {
    /// One line per schema: kind@major.minor, namespace, hash128, file.
    List,
    /// Print a schema (KIND, KIND@MAJOR or KIND@MAJOR.MINOR; the highest version by default).
    Show {
        /// The schema, such as `embedding@2`.
        #[arg(value_name = "KIND[@MAJOR[.MINOR]]")]
        schema: String,
    },
    /// Check an Ether (JSON file, `-` for stdin) against the schema of its kind and version.
    Check {
        /// The Ether.
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
    },
    /// Convert an Ether (JSON file, `-` for stdin) to another major version through the
    /// built-in adapters, and print it.
    Convert {
        /// The Ether.
        #[arg(value_name = "FILE|-")]
        file: PathBuf,
        /// The major version wanted.
        #[arg(long, value_name = "MAJOR")]
        to: u16,
    },
}

/// The schema options of `xcp serve`.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeSchemaArgs {
    /// Accept only these kinds and majors (KIND@MAJOR, comma-separated); others are refused
    /// (ERR_SCHEMA_UNKNOWN, ERR_KIND_MISMATCH) unless an adapter converts them. Default: any.
    #[arg(long, value_name = "KIND@MAJOR[,..]", value_delimiter = ',', value_parser = parse_kind_major)]
    pub accepts: Vec<KindRange>,

    /// Hold the schemas of this registry directory: payloads are validated (ERR_MALFORMED
    /// naming the JSON pointer) and schema hashes checked. With --accepts alone, the built-in
    /// standard kinds are held.
    #[arg(long, value_name = "DIR")]
    pub registry: Option<PathBuf>,
}

impl ServeSchemaArgs {
    /// Sets `accepts`, the registry and the built-in adapters on `conn` when any option is
    /// given (nothing changes otherwise).
    pub fn apply(&self, conn: &mut xcp::conn::Config) -> Result<(), String> {
        if self.accepts.is_empty() && self.registry.is_none() {
            return Ok(());
        }
        let registry = load(self.registry.as_ref())?;
        conn.accepts = self.accepts.clone();
        conn.registry = Some(Arc::new(registry));
        conn.adapters = AdapterGraph::standard();
        Ok(())
    }
}

/// `KIND@MAJOR` as the range of every minor of that major.
pub fn parse_kind_major(s: &str) -> Result<KindRange, String> {
    let (kind, major) = s
        .rsplit_once('@')
        .ok_or_else(|| format!("{s:?}: expected KIND@MAJOR, such as text@1"))?;
    let major: u16 = major
        .parse()
        .ok()
        .filter(|m| *m >= 1)
        .ok_or_else(|| format!("{s:?}: the major version must be 1..=65535"))?;
    if kind.is_empty() {
        return Err(format!("{s:?}: no kind before '@'"));
    }
    Ok(KindRange::of(kind, major))
}

fn load(dir: Option<&PathBuf>) -> Result<Registry, String> {
    match dir {
        None => Ok(Registry::standard()),
        Some(d) => Registry::load_dir(d).map_err(|e| format!("--registry {}: {e}", d.display())),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_ether(file: &PathBuf) -> Result<Ether, String> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
    };
    serde_json::from_str(&text).map_err(|e| format!("{}: not an Ether: {e}", file.display()))
}

/// Runs `xcp schema`; returns the exit code.
pub fn run(args: SchemaArgs) -> u8 {
    let reg = match load(args.registry.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match args.command {
        SchemaCommand::List => {
            for s in reg.iter() {
                let ns = if s.id().namespace.is_empty() {
                    "-"
                } else {
                    &s.id().namespace
                };
                println!("{}\t{ns}\t{}\t{}", s.id(), hex(&s.hash128()), s.file());
            }
            EXIT_OK
        }
        SchemaCommand::Show { schema } => match find(&reg, &schema) {
            Ok(s) => {
                println!(
                    "# {}  hash128 {}  ({})",
                    s.id(),
                    hex(&s.hash128()),
                    s.file()
                );
                println!(
                    "{}",
                    serde_json::to_string_pretty(s.document()).unwrap_or_default()
                );
                EXIT_OK
            }
            Err(e) => {
                eprintln!("error: {e}");
                EXIT_USAGE
            }
        },
        SchemaCommand::Check { file } => {
            let e = match read_ether(&file) {
                Ok(e) => e,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    return EXIT_USAGE;
                }
            };
            if let Err(err) = e.validate() {
                println!("invalid: {err}");
                return EXIT_FAILED;
            }
            let major = u16::try_from(e.schema_version).unwrap_or(u16::MAX);
            let Some(s) = reg.latest("", &e.kind, major) else {
                println!("unknown: no schema for {}@{major} in the registry", e.kind);
                return EXIT_FAILED;
            };
            if !Schema::validates() {
                eprintln!("warning: this build has no JSON Schema validation (feature `schema`)");
            }
            match s.validate(&serde_json::Value::Object(e.payload.clone())) {
                Ok(()) => {
                    println!("ok: {} (hash128 {})", s.id(), hex(&s.hash128()));
                    EXIT_OK
                }
                Err(err) => {
                    println!("invalid: {} at {}: {}", s.id(), err.pointer, err.message);
                    EXIT_FAILED
                }
            }
        }
        SchemaCommand::Convert { file, to } => {
            let mut e = match read_ether(&file) {
                Ok(e) => e,
                Err(msg) => {
                    eprintln!("error: {msg}");
                    return EXIT_USAGE;
                }
            };
            match AdapterGraph::standard().convert_to(&mut e, to) {
                Ok(_) => {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                    EXIT_OK
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    EXIT_FAILED
                }
            }
        }
    }
}

/// `KIND`, `KIND@MAJOR` or `KIND@MAJOR.MINOR` in the registry.
fn find<'r>(reg: &'r Registry, what: &str) -> Result<&'r Schema, String> {
    let (kind, version) = match what.rsplit_once('@') {
        Some((k, v)) => (k, Some(v)),
        None => (what, None),
    };
    let (major, minor) = match version {
        None => (None, None),
        Some(v) => {
            let (ma, mi) = match v.split_once('.') {
                Some((a, b)) => (a, Some(b)),
                None => (v, None),
            };
            let num = |s: &str| {
                s.parse::<u16>()
                    .map_err(|_| format!("{what:?}: bad version {s:?}"))
            };
            (Some(num(ma)?), mi.map(num).transpose()?)
        }
    };
    reg.iter()
        .filter(|s| s.id().kind == kind && s.id().namespace.is_empty())
        .filter(|s| major.is_none_or(|m| s.id().major == m))
        .filter(|s| minor.is_none_or(|m| s.id().minor == m))
        .max_by_key(|s| (s.id().major, s.id().minor))
        .ok_or_else(|| format!("no schema {what} in the registry"))
}
