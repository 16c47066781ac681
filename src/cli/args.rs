//! The command line's words: clap types, the parsers of their values, and the admin request
//! each command becomes.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::admin::Request;
use crate::keystone::{CacheTimes, ValidatorConfig};
use crate::model::{
    GlanceRegion, JobStatus, KeystoneCredentials, Limit, PeerRegion, RegionKind, SecretSource,
};
use crate::service::ImportRequest;
use crate::worker::MinFree;

#[derive(Parser, Debug)]
#[command(
    name = "image-replicator",
    version,
    about = "Copies VM images between regions behind the OpenStack image-replicator API",
    long_about = "Copies VM images between regions behind the OpenStack image-replicator API.\n\n\
        `serve` runs the HTTP API and the admin socket on a data directory. The other commands \
        administer that data directory: through the running server's admin socket when one \
        runs, or by opening the store directly when none does."
)]
pub struct Cli {
    /// Directory holding the store, the default region directories and the admin socket
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "IMAGE_REPLICATOR_DATA_DIR",
        default_value = "./image-replicator-data"
    )]
    pub data_dir: PathBuf,

    /// Print results as JSON instead of text
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// Log level of image-replicator (error, warn, info, debug, trace; other crates stay at
    /// warn), or RUST_LOG-style directives: debug,sled=debug
    /// [default: RUST_LOG as it is (trace: every crate), else info for serve and warn for the
    /// other commands]
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "LEVEL",
          env = "IMAGE_REPLICATOR_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log line format on stderr
    #[arg(long, global = true, help_heading = GLOBAL, env = "IMAGE_REPLICATOR_LOG_FORMAT",
          value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Keep the records in this PostgreSQL database (postgres://USER@HOST/DB, or
    /// postgres:///DB?host=/run/postgresql for a Unix socket) instead of sled in the data
    /// directory; appliances that share one database share their jobs
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "URL",
          env = "IMAGE_REPLICATOR_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PEM file of the certificates the database's TLS certificate chains to, besides the
    /// system's roots; turns TLS on, as sslmode=require in the URL does (TLS is always verified:
    /// the certificate must also name the URL's host)
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "FILE",
          env = "IMAGE_REPLICATOR_DATABASE_CA_FILE", requires = "database_url")]
    pub database_ca_file: Option<PathBuf>,

    /// Connections to PostgreSQL that this process keeps open at most (2 to 1000)
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "N",
          env = "IMAGE_REPLICATOR_DATABASE_POOL", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(2..=1000))]
    pub database_pool: u16,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The store the command opens, as this host (`serve --node-name` names the server).
    pub fn store_config(&self) -> crate::store::StoreConfig {
        crate::store::StoreConfig {
            database_url: self.database_url.clone(),
            database_ca_file: self.database_ca_file.clone(),
            pool: usize::from(self.database_pool),
            node: crate::store::host_name(),
        }
    }
}

/// A node name: 1 to 64 letters, digits, dots, dashes and underscores.
pub fn parse_node_name(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(s.to_string())
    } else {
        Err("a node name is 1 to 64 letters, digits, dots, dashes and underscores".into())
    }
}

/// The heading of the options every command takes, apart from each command's own.
const GLOBAL: &str = "Global options";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API and the admin socket until SIGINT or SIGTERM
    Serve(ServeArgs),
    /// Regions: where images are stored
    #[command(subcommand)]
    Region(RegionCmd),
    /// Tenants (projects): each lives in one region
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Users: members of tenants, optionally admins
    #[command(subcommand)]
    User(UserCmd),
    /// API tokens: issue, list, revoke
    #[command(subcommand)]
    Token(TokenCmd),
    /// Images: import files, list, show, delete
    #[command(subcommand)]
    Image(ImageCmd),
    /// Replication jobs: seed, list, show, cancel
    #[command(subcommand)]
    Job(JobCmd),
    /// Whether a server runs on the data directory, and its counters (exit status 0 when one
    /// runs, 3 when none does)
    Status,
    /// Write every record (regions, tenants, users, token hashes, images, manifests, jobs) to
    /// FILE, from one moment, also while the server runs; not the image bytes
    Backup {
        /// Where the backup goes (replaced atomically; mode 0600: it holds token hashes)
        file: PathBuf,
    },
    /// Restore a backup into a new or empty data directory (--data-dir)
    Restore {
        /// A file written by `image-replicator backup`
        file: PathBuf,
    },
    /// Copy the data directory's sled store into a PostgreSQL database, with the server
    /// stopped (run again, it adds what is missing; either way it checks that every record is
    /// there), then serve with --database-url URL; the image files stay where they are
    Migrate {
        /// The database: postgres://USER@HOST/DB (a password is better in PGPASSWORD or
        /// ~/.pgpass than in the URL)
        #[arg(long, value_name = "URL")]
        to: String,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(visible_alias = "completion")]
    Completions {
        /// The shell the script is for
        shell: clap_complete::Shell,
    },
    /// Print a command's man page (roff), or write every page into a directory
    #[command(after_help = "Examples:\n  \
        image-replicator man | man -l -\n  \
        image-replicator man job list | man -l -\n  \
        image-replicator man --out /usr/local/share/man/man1")]
    Man(ManArgs),
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// The command whose page to print, such as `job list` [default: the top-level page]
    #[arg(value_name = "SUBCOMMAND", conflicts_with = "out")]
    pub command: Vec<String>,
    /// Write every command's page into this directory (image-replicator.1,
    /// image-replicator-job-list.1, ...) instead of printing one
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the HTTP API: an IP address or a host name, and a port (port 0 picks a free
    /// port, printed at start)
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9292",
        value_parser = parse_listen
    )]
    pub listen: SocketAddr,
    /// Set up a demo lab (regions, tenants, a user, the reference's sample token, two images
    /// and the reference's three jobs) if the data directory has none yet, give its user and
    /// token back if they were removed or revoked, and cap copies at 256K unless
    /// --max-bandwidth says otherwise
    #[arg(long, env = "IMAGE_REPLICATOR_DEMO")]
    pub demo: bool,
    /// This appliance's name among those sharing one database: the holder of the jobs it
    /// copies (`job show`), and what `region add --pin` names [default: the host name]
    #[arg(long, env = "IMAGE_REPLICATOR_NODE_NAME", value_name = "NAME",
          value_parser = parse_node_name)]
    pub node_name: Option<String>,
    /// Serve the API and the admin socket only; copy nothing
    #[arg(long, env = "IMAGE_REPLICATOR_NO_WORKER")]
    pub no_worker: bool,
    /// Concurrent copies
    #[arg(long, env = "IMAGE_REPLICATOR_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: u16,
    /// Cap on all copies together, in bytes per second: 500K, 100M, 1G (binary multiples)
    #[arg(long, env = "IMAGE_REPLICATOR_MAX_BANDWIDTH", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Free space kept on every file system the appliance writes (the store's, each directory
    /// region's): copies that would use it are refused, and new jobs while the store's is
    /// short of it. A size such as 8M or 2G; 0 for none [default: 5 % of the file system, at
    /// least 64 MiB, at most 10 GiB]
    #[arg(long, env = "IMAGE_REPLICATOR_MIN_FREE", value_name = "SIZE", value_parser = parse_min_free)]
    pub min_free: Option<MinFree>,
    /// PEM certificate chain: serve HTTPS instead of HTTP (needs --tls-key)
    #[arg(long, env = "IMAGE_REPLICATOR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "IMAGE_REPLICATOR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Purge terminal jobs (replicated, canceled, error) this long after they ended, in the
    /// background: 30d, 12h, 90m, 45s [default: off, jobs are kept until `job purge`]
    #[arg(long, env = "IMAGE_REPLICATOR_JOB_RETENTION", value_name = "DURATION",
          value_parser = parse_age)]
    pub job_retention: Option<Duration>,
    #[command(flatten)]
    pub keystone: KeystoneArgs,
}

/// Accepting the tokens of an OpenStack cloud's Keystone besides the registry's own.
#[derive(Args, Debug)]
pub struct KeystoneArgs {
    /// Also accept tokens this Keystone v3 issues (such as https://keystone:5000/v3): a token
    /// the registry does not know is validated there; its project is the tenant
    #[arg(long, env = "IMAGE_REPLICATOR_KEYSTONE_URL", value_name = "URL")]
    pub keystone_url: Option<String>,
    /// The appliance's service user in that Keystone (it needs a role that may validate
    /// tokens and list role assignments, such as admin)
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_KEYSTONE_USERNAME",
        requires = "keystone_url"
    )]
    pub keystone_username: Option<String>,
    /// File whose first line is the service user's password [default: the environment
    /// variable IMAGE_REPLICATOR_KEYSTONE_PASSWORD]
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_KEYSTONE_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub keystone_password_file: Option<PathBuf>,
    /// Project the service user's tokens are scoped to
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_KEYSTONE_PROJECT",
        default_value = "service"
    )]
    pub keystone_project: String,
    /// Domain of the service user
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_KEYSTONE_USER_DOMAIN",
        default_value = "Default"
    )]
    pub keystone_user_domain: String,
    /// Domain of the service project
    #[arg(
        long,
        env = "IMAGE_REPLICATOR_KEYSTONE_PROJECT_DOMAIN",
        default_value = "Default"
    )]
    pub keystone_project_domain: String,
    /// How long a validated token is believed without asking again (capped by its expiry;
    /// 0s: ask at every request)
    #[arg(long, env = "IMAGE_REPLICATOR_KEYSTONE_CACHE_TTL", default_value = "300s",
          value_parser = parse_ttl)]
    pub keystone_cache_ttl: Duration,
    /// How long a token Keystone refused is refused without asking again
    #[arg(long, env = "IMAGE_REPLICATOR_KEYSTONE_NEGATIVE_TTL", default_value = "10s",
          value_parser = parse_ttl)]
    pub keystone_negative_ttl: Duration,
}

impl KeystoneArgs {
    /// The service credentials and cache times, if Keystone tokens are to be accepted.
    pub(super) fn validator_config(self) -> Result<Option<ValidatorConfig>, String> {
        let Some(auth_url) = self.keystone_url else {
            return Ok(None);
        };
        if !crate::model::is_http_url(&auth_url) {
            return Err(format!(
                "--keystone-url '{auth_url}' must start with http:// or https://"
            ));
        }
        let username = self
            .keystone_username
            .ok_or("--keystone-url needs --keystone-username")?;
        let password = match self.keystone_password_file {
            Some(file) => SecretSource::File(absolute(&file)?),
            None => SecretSource::Env(KEYSTONE_PASSWORD_ENV.into()),
        };
        Ok(Some(ValidatorConfig {
            credentials: KeystoneCredentials {
                auth_url,
                username,
                user_domain: self.keystone_user_domain,
                project: self.keystone_project,
                project_domain: self.keystone_project_domain,
                password,
            },
            times: CacheTimes {
                positive: self.keystone_cache_ttl,
                negative: self.keystone_negative_ttl,
            },
        }))
    }
}

/// Where `serve` reads the Keystone service password when no file is given.
const KEYSTONE_PASSWORD_ENV: &str = "IMAGE_REPLICATOR_KEYSTONE_PASSWORD";

/// `--listen`: an IP address and port, or a host name and port resolved now (its first IPv4
/// address, else its first).
fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let wrong = || format!("'{text}' is not an address such as 127.0.0.1:9292 or localhost:9292");
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(wrong());
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(wrong());
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("'{text}' does not resolve to an address: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{text}' resolves to no address"))
}

/// `--property KEY=VALUE`.
fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn parse_visibility(text: &str) -> Result<crate::model::Visibility, String> {
    text.parse()
}

/// A cache lifetime: 0 to one day.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    let ttl = if text.trim() == "0" {
        Duration::ZERO
    } else {
        humantime::parse_duration(text)
            .map_err(|_| format!("'{text}' is not a duration such as 0s, 30s or 5m"))?
    };
    if ttl > Duration::from_secs(24 * 3600) {
        return Err(format!("'{text}' is longer than a day"));
    }
    Ok(ttl)
}

/// An age or a retention: above zero, such as 30d, 12h, 90m or 45s.
fn parse_age(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(format!("'{text}' must be longer than zero")),
        Err(_) => Err(format!(
            "'{text}' is not a duration such as 30d, 12h, 90m or 45s"
        )),
    }
}

fn parse_lifetime(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|_| format!("'{text}' is not a duration such as 30m, 12h or 7days"))
}

/// `100M` → 104857600: a count of bytes with an optional K, M, G or T (binary) suffix (and
/// an optional B or iB); `kind` is what the value is, for the error ("a rate", "a size").
fn parse_bytes(text: &str, kind: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let trimmed = trimmed
        .strip_suffix("iB")
        .or_else(|| trimmed.strip_suffix('B'))
        .unwrap_or(trimmed);
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let wrong = || format!("'{text}' is not {kind} such as 500K, 100M or 1G");
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(wrong()),
    };
    let value: u64 = digits.parse().map_err(|_| wrong())?;
    match value.checked_shl(shift) {
        Some(bytes) if bytes >> shift == value => Ok(bytes),
        _ => Err(format!("'{text}' must be below 16 EiB")),
    }
}

/// A bandwidth: [`parse_bytes`] per second (`/s` optional), above zero.
fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let per_second = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    match parse_bytes(per_second, "a rate") {
        Ok(rate) if rate > 0 => Ok(rate),
        Ok(_) => Err(format!("'{text}' must be above zero and below 16 EiB/s")),
        Err(e) if e.ends_with("16 EiB") => {
            Err(format!("'{text}' must be above zero and below 16 EiB/s"))
        }
        Err(_) => Err(format!("'{text}' is not a rate such as 500K, 100M or 1G")),
    }
}

/// `--min-free`: a size (0: no reserve).
fn parse_min_free(text: &str) -> Result<MinFree, String> {
    parse_bytes(text, "a size").map(MinFree::Bytes)
}

/// A quota of bytes: a size, or `none` for no limit.
fn parse_quota_bytes(text: &str) -> Result<Limit, String> {
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(Limit::Unlimited);
    }
    parse_bytes(text, "a size (or none)").map(Limit::Max)
}

/// A quota of jobs: a count, or `none` for no limit.
fn parse_quota_jobs(text: &str) -> Result<Limit, String> {
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(Limit::Unlimited);
    }
    text.trim()
        .parse()
        .map(Limit::Max)
        .map_err(|_| format!("'{text}' is not a count of jobs such as 20 (or none)"))
}

#[derive(Subcommand, Debug)]
pub enum RegionCmd {
    /// Add a region: a local image directory (created), an OpenStack Glance v2 service, or a
    /// region of another image-replicator appliance (a peer)
    #[command(after_help = "Examples:\n  \
        image-replicator region add ot1\n  \
        image-replicator region add cloud --glance-url http://glance:9292\n  \
        image-replicator region add edge1 --peer-url https://edge1.example:9292 \\\n      \
        --peer-token-file /etc/image-replicator/edge1.token --peer-region ot1\n  \
        image-replicator region add cloud --glance-url https://glance:9292 --glance-auth keystone \\\n      \
        --auth-url https://keystone:5000/v3 --username replicator --project service \\\n      \
        --password-file /etc/image-replicator/cloud.password\n\n\
        The password (or the peer's token) is read from the file (first line) or the\n\
        environment variable by the serving process at each use; it is never stored or logged.\n\
        A peer's token is a token of the peer appliance: an admin token there lets this\n\
        appliance copy the images of every tenant, as with Glance.")]
    Add {
        /// Region id, such as ot1
        id: String,
        /// Image directory [default: <data-dir>/regions/<ID>]
        #[arg(long, conflicts_with = "glance_url")]
        dir: Option<PathBuf>,
        /// Comma-separated disk formats the region accepts [default: all of Glance's]
        #[arg(long, value_delimiter = ',')]
        disk_formats: Option<Vec<String>>,
        /// Only the appliance of this node name (`serve --node-name`) runs jobs touching the
        /// region: for a directory that only its machine mounts, when several appliances share
        /// one database [default: any appliance]
        #[arg(long, value_name = "NODE", value_parser = parse_node_name)]
        pin: Option<String>,
        #[command(flatten)]
        glance: Box<GlanceArgs>,
        #[command(flatten)]
        peer: Box<PeerArgs>,
    },
    /// List regions
    List,
    /// Remove a region that no tenant or image uses (its directory is left on disk)
    Remove {
        /// Region id
        id: String,
    },
}

/// How a region reaches its Glance.
#[derive(Args, Debug, Default)]
pub struct GlanceArgs {
    /// The region is this Glance v2 endpoint (base URL, without /v2)
    #[arg(long, value_name = "URL")]
    glance_url: Option<String>,
    /// How the appliance authenticates to Glance
    #[arg(long, value_enum, default_value_t = GlanceAuth::None, requires = "glance_url")]
    glance_auth: GlanceAuth,
    /// Keystone v3 URL for --glance-auth keystone, such as https://keystone:5000/v3
    #[arg(long, value_name = "URL")]
    auth_url: Option<String>,
    /// Keystone user the appliance acts as (it needs the admin role to set image owners)
    #[arg(long)]
    username: Option<String>,
    /// File whose first line is that user's password
    #[arg(long, value_name = "FILE", conflicts_with = "password_env")]
    password_file: Option<PathBuf>,
    /// Environment variable of the serving process that holds the password
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Project the tokens are scoped to
    #[arg(long)]
    project: Option<String>,
    /// Domain of the user
    #[arg(long, default_value = "Default")]
    user_domain: String,
    /// Domain of the project
    #[arg(long, default_value = "Default")]
    project_domain: String,
}

/// How a region reaches another appliance.
#[derive(Args, Debug, Default)]
pub struct PeerArgs {
    /// The region is a region of the image-replicator appliance at this base URL
    #[arg(long, value_name = "URL", conflicts_with_all = ["glance_url", "dir"])]
    peer_url: Option<String>,
    /// File whose first line is a token of the peer appliance
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "peer_token_env",
        requires = "peer_url"
    )]
    peer_token_file: Option<PathBuf>,
    /// Environment variable of the serving process that holds the peer's token
    #[arg(long, value_name = "VAR", requires = "peer_url")]
    peer_token_env: Option<String>,
    /// The peer's region [default: the region id]
    #[arg(long, value_name = "REGION", requires = "peer_url")]
    peer_region: Option<String>,
    /// PEM file of the certificates the peer's TLS certificate chains to (besides the system's)
    #[arg(long, value_name = "FILE", requires = "peer_url")]
    peer_ca_file: Option<PathBuf>,
}

impl PeerArgs {
    /// The peer settings of region `id`, if it is a peer region.
    fn region(self, id: &str) -> Result<Option<PeerRegion>, String> {
        let Some(url) = self.peer_url else {
            return Ok(None);
        };
        if !crate::model::is_http_url(&url) {
            return Err(format!(
                "--peer-url '{url}' must start with http:// or https://"
            ));
        }
        let token = match (self.peer_token_file, self.peer_token_env) {
            (Some(file), _) => SecretSource::File(absolute(&file)?),
            (None, Some(var)) => SecretSource::Env(var),
            (None, None) => {
                return Err(
                    "--peer-url needs --peer-token-file FILE or --peer-token-env VAR".into(),
                )
            }
        };
        Ok(Some(PeerRegion {
            url,
            region: self.peer_region.unwrap_or_else(|| id.to_string()),
            token,
            ca_file: self.peer_ca_file.as_deref().map(absolute).transpose()?,
        }))
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq)]
enum GlanceAuth {
    /// Glance runs without authentication
    #[default]
    None,
    /// Tokens from Keystone v3 by password
    Keystone,
}

impl GlanceArgs {
    /// The Glance settings, if the region is a Glance one; what is missing if they are not
    /// complete.
    fn region(self) -> Result<Option<GlanceRegion>, String> {
        let keystone_flags = self.auth_url.is_some()
            || self.username.is_some()
            || self.password_file.is_some()
            || self.password_env.is_some()
            || self.project.is_some();
        let Some(url) = self.glance_url else {
            if keystone_flags {
                return Err(
                    "the Keystone options need --glance-url and --glance-auth keystone".into(),
                );
            }
            return Ok(None);
        };
        if !crate::model::is_http_url(&url) {
            return Err(format!(
                "--glance-url '{url}' must start with http:// or https://"
            ));
        }
        if self.glance_auth == GlanceAuth::None {
            if keystone_flags {
                return Err("the Keystone options need --glance-auth keystone".into());
            }
            return Ok(Some(GlanceRegion {
                url,
                keystone: None,
            }));
        }
        let missing = |what: &str| format!("--glance-auth keystone needs {what}");
        let password = match (self.password_file, self.password_env) {
            (Some(file), _) => SecretSource::File(absolute(&file)?),
            (None, Some(var)) => SecretSource::Env(var),
            (None, None) => return Err(missing("--password-file FILE or --password-env VAR")),
        };
        Ok(Some(GlanceRegion {
            url,
            keystone: Some(KeystoneCredentials {
                auth_url: self.auth_url.ok_or_else(|| missing("--auth-url"))?,
                username: self.username.ok_or_else(|| missing("--username"))?,
                user_domain: self.user_domain,
                project: self.project.ok_or_else(|| missing("--project"))?,
                project_domain: self.project_domain,
                password,
            }),
        }))
    }
}

#[derive(Subcommand, Debug)]
pub enum TenantCmd {
    /// Add a tenant
    Add {
        /// 32 hex digits (Keystone style) or a hyphenated UUID
        tenant_id: String,
        /// The region its images live in
        #[arg(long)]
        region: String,
        /// A name for people
        #[arg(long)]
        name: Option<String>,
        /// Most bytes of images the tenant may hold, copies into it under way included: a
        /// size such as 10G [default: none]
        #[arg(long, value_name = "SIZE", value_parser = parse_quota_bytes)]
        quota_bytes: Option<Limit>,
        /// Most of its jobs that may be queued or copying at once [default: none]
        #[arg(long, value_name = "COUNT", value_parser = parse_quota_jobs)]
        quota_jobs: Option<Limit>,
    },
    /// Set or clear a tenant's quotas (none: no limit); they apply to the next request
    Update {
        /// The tenant's id
        tenant_id: String,
        /// Most bytes of images the tenant may hold: a size such as 10G, or none
        #[arg(long, value_name = "SIZE", value_parser = parse_quota_bytes)]
        quota_bytes: Option<Limit>,
        /// Most of its jobs that may be queued or copying at once: a count, or none
        #[arg(long, value_name = "COUNT", value_parser = parse_quota_jobs)]
        quota_jobs: Option<Limit>,
    },
    /// List tenants
    List,
    /// Remove a tenant that no user, image or job refers to
    Remove {
        /// The tenant's id
        tenant_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user
    Add {
        /// The user's name, which tokens are issued for
        name: String,
        /// A tenant the user is a member of (repeat for several)
        #[arg(long = "tenant", required = true, value_name = "TENANT_ID")]
        tenants: Vec<String>,
        /// The user sees and cancels every tenant's jobs and may copy to any tenant
        #[arg(long)]
        admin: bool,
    },
    /// Change a user's tenants or admin flag; its tokens for the tenants it keeps stay valid,
    /// those for a removed tenant are revoked
    Update {
        /// The user's name
        name: String,
        /// Make the user a member of this tenant too (repeat for several)
        #[arg(long = "add-tenant", value_name = "TENANT_ID")]
        add_tenants: Vec<String>,
        /// End the user's membership of this tenant (repeat for several); a user keeps at
        /// least one tenant
        #[arg(long = "remove-tenant", value_name = "TENANT_ID")]
        remove_tenants: Vec<String>,
        /// Make the user an admin
        #[arg(long, conflicts_with = "no_admin")]
        admin: bool,
        /// Make the user an ordinary member again
        #[arg(long)]
        no_admin: bool,
    },
    /// List users
    List,
    /// Remove a user and revoke all of its tokens
    Remove {
        /// The user's name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Issue a token and print it once on stdout, its id on stderr (only its argon2id hash is
    /// kept)
    Issue {
        /// The user the token acts as
        #[arg(long)]
        user: String,
        /// The tenant the token acts for; the user must be a member
        #[arg(long)]
        tenant: String,
        /// Lifetime, such as 30m, 12h or 7days [default: no expiry]
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<Duration>,
        /// Register this value instead of generating one (8-256 printable ASCII characters).
        /// Other users of the machine can read it in `ps`: prefer --token-file
        #[arg(long, value_name = "VALUE")]
        token: Option<String>,
        /// Register the value on this file's first line (`-`: standard input) instead of
        /// generating one
        #[arg(long, value_name = "FILE", conflicts_with = "token")]
        token_file: Option<PathBuf>,
    },
    /// List tokens that still work, oldest first (ids and owners; never the tokens themselves)
    List {
        /// Also list expired and revoked tokens
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token by its id (from `token list`); it fails from the next request on
    Revoke {
        /// The token's id (not the token)
        token_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Copy a file into the tenant's region as a new active image; prints its id
    Import {
        /// The image file (a regular file; it is copied, not moved)
        file: PathBuf,
        /// The tenant that owns the image; it goes into that tenant's region
        #[arg(long)]
        tenant: String,
        /// The image's name, as Glance shows it
        #[arg(long)]
        name: String,
        /// The image's disk format; without it, the one its bytes show (qcow2, vmdk, vhd,
        /// vhdx, iso or raw). One that its bytes contradict is refused
        #[arg(long)]
        disk_format: Option<String>,
        /// Glance container format: bare, ovf, ova, ...
        #[arg(long, default_value = "bare")]
        container_format: String,
        /// Use this image id instead of a new one
        #[arg(long)]
        id: Option<uuid::Uuid>,
        /// A property of the image, as the images API shows it (repeatable)
        #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
        properties: Vec<(String, String)>,
        /// Who may see the image in the images API: public, community, shared (the default)
        /// or private
        #[arg(long, value_parser = parse_visibility)]
        visibility: Option<crate::model::Visibility>,
        /// Not deletable until unprotected
        #[arg(long)]
        protected: bool,
    },
    /// List images
    List {
        /// Only the images this tenant owns
        #[arg(long)]
        tenant: Option<String>,
        /// Only the images of this region
        #[arg(long)]
        region: Option<String>,
    },
    /// Show one image
    Show {
        /// The image's id
        id: String,
    },
    /// Delete an image's data and mark it deleted
    Delete {
        /// The image's id
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Import jobs from a JSON array in the list-response format ("-" reads stdin)
    ///
    /// The file is read and written in batches as it streams, so it may be of any size. All or
    /// nothing: a bad entry, an id twice in the file or one that exists with other content
    /// removes every job the run inserted, and the message names the job. Seeding the same
    /// file again adds nothing (its jobs count as already present). A run killed part way (or
    /// a crash of the server) leaves some of the file's jobs in and none enqueued: run it
    /// again to complete it.
    Seed {
        /// The JSON file ("-": standard input)
        file: PathBuf,
        /// Let the replication worker run the file's seeded jobs that are not finished, once
        /// the whole file is in (also those an earlier seed of them left unenqueued)
        #[arg(long)]
        enqueue: bool,
    },
    /// List jobs, oldest first
    List {
        /// Only jobs whose source tenant is this one
        #[arg(long)]
        tenant: Option<String>,
        /// Only jobs in this status
        #[arg(long, value_enum)]
        status: Option<JobStatus>,
    },
    /// Show one job, with its progress in bytes and any error
    Show {
        /// The job's id
        job_id: String,
    },
    /// Cancel a replicate_requested or replicating job
    Cancel {
        /// The job's id
        job_id: String,
    },
    /// Queue a new job with the same image and destination as an error or canceled job;
    /// prints the new job's id
    Retry {
        /// The error or canceled job's id
        job_id: String,
    },
    /// Remove terminal jobs that ended at least --older-than ago (they no longer pin their
    /// tenants)
    Purge {
        /// Such as 30d, 12h, 90m or 45s
        #[arg(long, value_name = "DURATION", value_parser = parse_age)]
        older_than: Duration,
        /// Only jobs in this status: replicated, canceled or error (repeat for several)
        /// [default: all three]
        #[arg(long = "status", value_name = "STATUS")]
        statuses: Vec<JobStatus>,
    },
    /// Follow running jobs (or one) until they end: progress bars with rate and ETA on a
    /// terminal, plain progress lines otherwise
    #[command(
        after_help = "Exit status: 0 when every job watched ended replicated (or there was \
        none to watch), 3 when one ended in error, 4 when one was canceled (and none in \
        error), 1 when the command failed."
    )]
    Watch {
        /// The job to follow [default: every queued or running job]
        job_id: Option<String>,
        /// Wait for the job (or, without JOB_ID, for a first active job) to appear instead of
        /// ending at once
        #[arg(long)]
        wait: bool,
    },
}

impl clap::ValueEnum for JobStatus {
    fn value_variants<'a>() -> &'a [Self] {
        &JobStatus::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

pub(super) fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What follows a request to the server: a seed's file.
pub(super) type Input = Box<dyn Read>;

/// The admin request for a command, the verb its text output uses, and the input that follows
/// the request (`job seed`'s file, opened and not yet read).
pub(super) fn request_for(
    command: Command,
) -> Result<(Request, &'static str, Option<Input>), String> {
    let mut input = None;
    let (request, verb) = request_and_input(command, &mut input)?;
    Ok((request, verb, input))
}

fn request_and_input(
    command: Command,
    input: &mut Option<Input>,
) -> Result<(Request, &'static str), String> {
    Ok(match command {
        Command::Serve(_)
        | Command::Completions { .. }
        | Command::Man(_)
        | Command::Restore { .. }
        | Command::Migrate { .. } => return Err("not an admin command".into()),
        Command::Status => (Request::Status, ""),
        Command::Backup { .. } => (Request::Backup, ""),
        Command::Region(cmd) => match cmd {
            RegionCmd::Add {
                id,
                dir,
                disk_formats,
                pin,
                glance,
                peer,
            } => {
                // clap keeps --dir, the Glance and the peer options apart.
                let kind = match (glance.region()?, peer.region(&id)?, dir) {
                    (Some(glance), _, _) => Some(RegionKind::Glance { glance }),
                    (None, Some(peer), _) => Some(RegionKind::Peer { peer }),
                    (None, None, Some(dir)) => Some(RegionKind::Directory {
                        dir: absolute(&dir)?,
                    }),
                    (None, None, None) => None,
                };
                (
                    Request::RegionAdd {
                        id,
                        kind,
                        disk_formats,
                        pin,
                    },
                    "added",
                )
            }
            RegionCmd::List => (Request::RegionList, ""),
            RegionCmd::Remove { id } => (Request::RegionRemove { id }, "removed"),
        },
        Command::Tenant(cmd) => match cmd {
            TenantCmd::Add {
                tenant_id,
                region,
                name,
                quota_bytes,
                quota_jobs,
            } => (
                Request::TenantAdd {
                    id: tenant_id,
                    region,
                    name,
                    quota_bytes: quota_bytes.and_then(Limit::value),
                    quota_jobs: quota_jobs.and_then(Limit::value),
                },
                "added",
            ),
            TenantCmd::Update {
                tenant_id,
                quota_bytes,
                quota_jobs,
            } => (
                Request::TenantUpdate {
                    id: tenant_id,
                    quota_bytes,
                    quota_jobs,
                },
                "updated",
            ),
            TenantCmd::List => (Request::TenantList, ""),
            TenantCmd::Remove { tenant_id } => (Request::TenantRemove { id: tenant_id }, "removed"),
        },
        Command::User(cmd) => match cmd {
            UserCmd::Add {
                name,
                tenants,
                admin,
            } => (
                Request::UserAdd {
                    name,
                    tenants,
                    admin,
                },
                "added",
            ),
            UserCmd::Update {
                name,
                add_tenants,
                remove_tenants,
                admin,
                no_admin,
            } => (
                Request::UserUpdate {
                    name,
                    add_tenants,
                    remove_tenants,
                    admin: match (admin, no_admin) {
                        (true, _) => Some(true),
                        (_, true) => Some(false),
                        _ => None,
                    },
                },
                "updated",
            ),
            UserCmd::List => (Request::UserList, ""),
            UserCmd::Remove { name } => (Request::UserRemove { name }, "removed"),
        },
        Command::Token(cmd) => match cmd {
            TokenCmd::Issue {
                user,
                tenant,
                expires_in,
                token,
                token_file,
            } => (
                Request::TokenIssue {
                    user,
                    tenant,
                    expires_in_secs: expires_in
                        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                    value: match token_file {
                        Some(file) => Some(read_token_file(&file)?),
                        None => token,
                    },
                },
                "",
            ),
            TokenCmd::List { .. } => (Request::TokenList, ""),
            TokenCmd::Revoke { token_id } => (Request::TokenRevoke { id: token_id }, "revoked"),
        },
        Command::Image(cmd) => match cmd {
            ImageCmd::Import {
                file,
                tenant,
                name,
                disk_format,
                container_format,
                id,
                properties,
                visibility,
                protected,
            } => (
                Request::ImageImport(ImportRequest {
                    file: absolute(&file)?,
                    tenant,
                    name,
                    disk_format,
                    container_format,
                    id,
                    meta: crate::model::ImageMeta {
                        visibility: visibility.unwrap_or_default(),
                        protected,
                        properties: properties.into_iter().collect(),
                        ..Default::default()
                    },
                }),
                "imported",
            ),
            ImageCmd::List { tenant, region } => (Request::ImageList { tenant, region }, ""),
            ImageCmd::Show { id } => (Request::ImageShow { id }, ""),
            ImageCmd::Delete { id } => (Request::ImageDelete { id }, "deleted"),
        },
        Command::Job(cmd) => match cmd {
            JobCmd::Seed { file, enqueue } => {
                let (name, opened) = open_seed(&file)?;
                *input = Some(opened);
                (Request::JobSeed { enqueue, name }, "")
            }
            JobCmd::List { tenant, status } => (Request::JobList { tenant, status }, ""),
            JobCmd::Show { job_id } => (Request::JobShow { id: job_id }, ""),
            JobCmd::Cancel { job_id } => (Request::JobCancel { id: job_id }, "cancel requested"),
            JobCmd::Retry { job_id } => (Request::JobRetry { id: job_id }, "retry"),
            JobCmd::Purge {
                older_than,
                statuses,
            } => (
                Request::JobPurge(crate::service::PurgeRule {
                    older_than_secs: older_than.as_secs().max(1),
                    statuses,
                }),
                "",
            ),
            JobCmd::Watch { .. } => return Err("job watch is not an admin request".into()),
        },
    })
}

/// Bytes of a token file read at most: a token is 256 characters at most.
const MAX_TOKEN_LINE: u64 = 4096;

/// The first line of `file` (`-`: standard input), without its line end: a token value kept
/// out of the process list. Errors never quote it.
fn read_token_file(file: &Path) -> Result<String, String> {
    use std::io::BufRead;
    let (shown, source): (String, Box<dyn Read>) = if file == Path::new("-") {
        ("standard input".into(), Box::new(std::io::stdin()))
    } else {
        let opened = std::fs::File::open(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        (file.display().to_string(), Box::new(opened))
    };
    let mut line = String::new();
    std::io::BufReader::new(source.take(MAX_TOKEN_LINE))
        .read_line(&mut line)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let value = line.strip_suffix('\n').unwrap_or(&line);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(format!("{shown} holds no token on its first line"));
    }
    Ok(value.to_string())
}

/// A seed file (`-`: standard input), opened, with what messages call it.
fn open_seed(file: &Path) -> Result<(String, Input), String> {
    if file == Path::new("-") {
        return Ok(("standard input".into(), Box::new(std::io::stdin())));
    }
    let opened =
        std::fs::File::open(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    Ok((file.display().to_string(), Box::new(opened)))
}
