//! The command line: `serve`, `check-config`, `keys`, `grants`, `policy simulate`, `decrypt`
//! (offline), `audit-verify`, and for packagers `completions` and `man`.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{self, Config, RouteKind};
use crate::keys::keyring::Keyring;
use crate::keys::{KeyRef, KeyService};
use crate::metrics::Metrics;
use crate::transform::json_fields::{self, RequestMeta};

/// `--version`: the crate's version and the git revision it was built from (build.rs:
/// ENVELOPE_PROXY_GIT_REV, "unknown" when built outside a git checkout without it).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (rev ",
    env!("ENVELOPE_PROXY_GIT_REV"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "envelope-proxy",
    version = VERSION,
    about = "Transparent envelope encryption proxy"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "ENVELOPE_PROXY_CONFIG",
        default_value = "envelope-proxy.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve,
    /// Check a configuration file and list every problem with its place.
    CheckConfig {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Manage root keys in the local keyring.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Key policies: what a request would get.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Manage grants in the grants file (offline; running proxies read the file again within
    /// `[grants] reload_secs`).
    Grants {
        #[command(subcommand)]
        action: GrantsAction,
    },
    /// Decrypt a token or a JSON document offline, with the same keys as the proxy.
    ///
    /// Reads stdin: a bare token (`enc:v1:...`, quoted or not) or a JSON document as stored.
    /// Context values the route derives from requests must be given with --context NAME=VALUE.
    Decrypt {
        /// Route whose fields and context apply (default: the only encrypting route).
        #[arg(long)]
        route: Option<String>,
        /// A context value, by context key name (repeatable).
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
        /// For a bare token: the configured field path it was sealed under.
        #[arg(long)]
        field: Option<String>,
        /// Read v2 tokens' data-key records from this export (`keys vault-export`) instead of
        /// the route's vault.
        #[arg(long)]
        vault_export: Option<PathBuf>,
    },
    /// Decrypt an S3 object fetched straight from storage (body on stdin, plaintext on stdout).
    ///
    /// The metadata comes from `aws s3api head-object` (JSON) or as NAME=VALUE lines with
    /// x-amz-meta-ep-envelope and x-amz-meta-ep-object. Context values the route derives from
    /// requests (e.g. the bucket) must be given with --context NAME=VALUE.
    DecryptObject {
        /// S3 route whose keys and context apply (default: the only S3 route).
        #[arg(long)]
        route: Option<String>,
        /// A context value, by context key name (repeatable).
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
        /// File with the object's metadata.
        #[arg(long)]
        metadata: PathBuf,
        /// The object's bucket (required, with --key, for objects in format 2).
        #[arg(long, requires = "key")]
        bucket: Option<String>,
        /// The object's key as S3 stores it (not URL-encoded).
        #[arg(long, requires = "bucket")]
        key: Option<String>,
    },
    /// Check an audit log: its keyed chain (the audit key comes from --config) and, with
    /// --checkpoints, that no line named by a checkpoint was cut off the end.
    AuditVerify {
        file: PathBuf,
        /// A copy of the checkpoints (shipped off the host; default: FILE.checkpoints if present).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Re-encrypt stored data through a route so old key versions can be retired
    /// (exit status 0: done, 1: errors, 2: conflicts left, run again).
    Reencrypt(Box<crate::reencrypt::Args>),
    /// Print a shell completion script to stdout.
    ///
    /// bash: `envelope-proxy completions bash > /etc/bash_completion.d/envelope-proxy`;
    /// zsh: into a directory on $fpath as `_envelope-proxy`; fish:
    /// `~/.config/fish/completions/envelope-proxy.fish`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or with --out-dir write one page per command there.
    ///
    /// `envelope-proxy man | man -l -`; packagers: `envelope-proxy man --out-dir
    /// /usr/share/man/man1`.
    Man {
        /// Write envelope-proxy.1 and a page per subcommand (envelope-proxy-keys-create.1, ...).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// List root keys.
    List,
    /// Create a root key (`--origin external`: waits for imported material, BYOK).
    Create {
        name: String,
        #[arg(long, value_parser = ["proxy", "external"], default_value = "proxy")]
        origin: String,
    },
    /// State, origin, versions with dates, rotation, aliases, last use and deletion date.
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a new version to a root key; new writes use it, old data still decrypts.
    Rotate { name: String },
    /// Rotate automatically every DAYS days (90-2560), or not (`--off`).
    SetRotation {
        name: String,
        #[arg(long, required_unless_present = "off", conflicts_with = "off")]
        days: Option<u32>,
        #[arg(long)]
        off: bool,
    },
    /// Disable a root key: nothing under it encrypts or decrypts until it is enabled again.
    Disable { name: String },
    /// Enable a disabled root key.
    Enable { name: String },
    /// Schedule the deletion of a root key after a waiting period (7-30 days): meanwhile it
    /// neither encrypts nor decrypts (each attempt is refused and counted: the alarm), then its
    /// material is destroyed and data under it is unrecoverable.
    ScheduleDeletion {
        name: String,
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Cancel a scheduled deletion (the key becomes disabled: enable it to use it).
    CancelDeletion { name: String },
    /// Write a wrapping key (RSA-3072, DIR/wrapping-key.pem) and an import token
    /// (DIR/import-token.bin), valid 24 hours, to import key material into an external key.
    ImportParams {
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Import key material wrapped with RSA-OAEP SHA-256 under the wrapping key.
    Import {
        name: String,
        /// The wrapped material (openssl pkeyutl output).
        #[arg(long)]
        material: PathBuf,
        /// The import token from `keys import-params`.
        #[arg(long)]
        token: PathBuf,
        /// When the material expires (2027-06-30, or an RFC 3339 time); the key then waits
        /// for the same material again.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Aliases: names routes use (`key = "alias/users"`) that can be re-pointed.
    Alias {
        #[command(subcommand)]
        action: AliasAction,
    },
    /// Remove a (non-current) version for good once nothing uses it: data still under it
    /// becomes unreadable. Refused while the proxy used the version in the last DAYS days.
    RetireVersion {
        name: String,
        #[arg(long)]
        version: u32,
        #[arg(long, default_value_t = 30)]
        unused_days: u64,
    },
    /// Uses of each version of a key: last use from the keyring's usage notes, and with
    /// --audit FILE the requests in the audit log (per version where lines name them).
    Usage {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        audit: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Knowingly go back to an older keyring (a restored backup): record its generation N as
    /// the high-water mark. Running proxies keep refusing it until they are restarted.
    AcceptGeneration { generation: u64 },
    /// Re-wrap the data-key records of a v2 route's vault under the route's keys at their
    /// current versions (or new backends): the data is not touched. Records already current
    /// are skipped unless --force. Exit status 1 when a record failed or changed meanwhile.
    Rewrap {
        #[arg(long)]
        route: String,
        #[arg(long)]
        force: bool,
        /// Also open EDKs under KEY (repeat): to move records from a key or backend the route
        /// no longer names. Without it only the route's own keys open records; records of
        /// other keys (another route's, in a shared vault) are left alone and counted.
        #[arg(long = "from", value_name = "KEY", value_parser = parse_key_ref)]
        from: Vec<crate::config::KeyRef>,
    },
    /// Crypto-shredding: schedule the deletion of every data-key record of one key context
    /// (values under them stop opening at once, 409 key_record_pending_shred); after the
    /// window `--apply-due` deletes them and those values are unrecoverable. `--cancel` keeps
    /// them.
    Shred {
        #[arg(long)]
        route: String,
        /// The key context, NAME=VALUE (repeat for each of the route's context keys).
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
        /// Waiting period (7-30 days).
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long, conflicts_with = "apply_due")]
        cancel: bool,
        /// Delete the records whose window has passed (every key context; run it daily).
        #[arg(long)]
        apply_due: bool,
    },
    /// Write every data-key record of a route's vault to FILE (JSON), for `decrypt
    /// --vault-export` on a machine without the store.
    VaultExport {
        #[arg(long)]
        route: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AliasAction {
    /// Create ALIAS (alias/NAME) pointing at KEY.
    Create { alias: String, key: String },
    /// Re-point ALIAS at KEY: new writes use KEY; what was written under the old key still
    /// decrypts (its wrapped keys name the key, not the alias).
    Update { alias: String, key: String },
    /// Delete ALIAS (routes naming it stop resolving; data is untouched).
    Delete { alias: String },
    /// List aliases.
    List,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Decide one key use as the running proxy would (exit status 0 allow, 1 deny).
    Simulate {
        /// The principal's name (a SPIFFE id, a JWT subject, an S3 client identity, anonymous).
        #[arg(long)]
        principal: String,
        /// How it authenticated: none, mtls, jwt, trusted-header, sigv4 (for `METHOD:` patterns).
        #[arg(long, default_value = "none")]
        auth: String,
        /// A principal attribute NAME=VALUE (repeatable).
        #[arg(long = "attribute", value_parser = parse_pair)]
        attributes: Vec<(String, String)>,
        /// A JWT claim NAME=VALUE (repeatable).
        #[arg(long = "claim", value_parser = parse_pair)]
        claims: Vec<(String, String)>,
        /// The root key, as routes name it (`users`, `kms:alias/app`).
        #[arg(long)]
        key: String,
        /// seal, open, open-masked, reencrypt, describe, rotate, ...
        #[arg(long, default_value = "open")]
        action: String,
        /// An encryption-context pair NAME=VALUE (repeatable).
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
}

#[derive(Subcommand)]
enum GrantsAction {
    /// Create a grant; prints its id and grant token (give the token to the grantee).
    Create {
        /// The key: `name` (local keyring) or `backend:key`.
        #[arg(long)]
        key: String,
        /// The principal name the grant is for.
        #[arg(long)]
        grantee: String,
        /// Grantable actions, comma-separated: seal, open, open-masked, reencrypt, describe.
        #[arg(long, value_delimiter = ',', required = true)]
        operations: Vec<String>,
        /// The encryption context must be exactly these pairs (repeatable NAME=VALUE).
        #[arg(long = "context-equals", value_parser = parse_pair, conflicts_with = "subset")]
        equals: Vec<(String, String)>,
        /// The encryption context must contain these pairs (repeatable NAME=VALUE).
        #[arg(long = "context-subset", value_parser = parse_pair)]
        subset: Vec<(String, String)>,
        /// Who besides the grantee may retire the grant.
        #[arg(long)]
        retiring_principal: Option<String>,
        /// The grant allows nothing after this many seconds.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// List grants (JSON lines), by key and/or grantee.
    List {
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        grantee: Option<String>,
    },
    /// Retire a grant, as its grantee or retiring principal.
    Retire {
        id: String,
        /// The principal retiring it (the grantee or the retiring principal).
        #[arg(long = "as")]
        principal: String,
    },
    /// Revoke a grant (an administrator's act).
    Revoke { id: String },
}

fn parse_key_ref(s: &str) -> Result<crate::config::KeyRef, String> {
    crate::config::KeyRef::parse(s).ok_or_else(|| format!("not a key (KEY or BACKEND:KEY): {s:?}"))
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spans are exported by the server only; the offline commands have none worth sending.
    let otlp = matches!(cli.command, Command::Serve)
        .then(|| crate::telemetry::endpoint(Some(&cli.config)))
        .flatten()
        .map(|e| (e, runtime.handle().clone()));
    crate::logging::init(crate::logging::Format::choose(Some(&cli.config)), otlp);
    let code = if let Command::Reencrypt(args) = cli.command {
        runtime.block_on(crate::reencrypt::main(&cli.config, *args))
    } else {
        match runtime.block_on(run(cli)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    };
    crate::telemetry::shutdown();
    code
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    config::load(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn open_keyring(cfg: &Config) -> Result<Arc<Keyring>, String> {
    let settings = keyring_settings(cfg)?;
    Keyring::open(
        KeyRef::DEFAULT_BACKEND,
        &settings.path,
        &settings.master_key,
    )
    .map_err(|e| e.to_string())
}

/// `[keyring]`, which the key and grant commands need.
fn keyring_settings(cfg: &Config) -> Result<&config::KeyringSettings, String> {
    cfg.keyring
        .as_ref()
        .ok_or_else(|| "the config has no [keyring] section (keys live on remote backends)".into())
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve => crate::server::run_file(&cli.config).await,
        // Its own exit statuses: run by `main` before this.
        Command::Reencrypt(args) => {
            crate::reencrypt::main(&cli.config, *args).await;
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "envelope-proxy", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out_dir } => {
            let cmd = Cli::command();
            match out_dir {
                Some(dir) => clap_mangen::generate_to(cmd, &dir)
                    .map_err(|e| format!("{}: {e}", dir.display())),
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .map_err(|e| format!("stdout: {e}")),
            }
        }
        Command::CheckConfig { file } => {
            let path = file.unwrap_or(cli.config);
            let cfg = load(&path)?;
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            println!("{}: OK ({} routes)", path.display(), cfg.routes.len());
            Ok(())
        }
        Command::Policy {
            action:
                PolicyAction::Simulate {
                    principal,
                    auth,
                    attributes,
                    claims,
                    key,
                    action,
                    context,
                },
        } => {
            let cfg = load(&cli.config)?;
            let key =
                KeyRef::parse(&key).ok_or_else(|| format!("{key:?} is not a key reference"))?;
            let action = config::Action::parse(&action)
                .ok_or_else(|| format!("{action:?} is not an action"))?;
            let method = [
                config::RouteAuth::None,
                config::RouteAuth::Mtls,
                config::RouteAuth::Jwt,
                config::RouteAuth::TrustedHeader,
                config::RouteAuth::SigV4,
            ]
            .into_iter()
            .find(|m| m.name() == auth)
            .ok_or_else(|| format!("--auth {auth:?}: none, mtls, jwt, trusted-header or sigv4"))?;
            let mut p = crate::auth::Principal::new(principal, method);
            p.attributes = attributes.into_iter().collect();
            p.claims = claims.into_iter().collect();
            let mut ctx = crate::envelope::Context::new();
            for (k, v) in context {
                ctx.insert(k, v);
            }
            // Grants count too: the grants file, read as the running proxy reads it (its keys
            // come from the keyring; without a keyring there are no grants, and nothing is
            // created to find that out).
            let grants = match &cfg.keyring {
                Some(k) if k.path.exists() => {
                    let keyring = open_keyring(&cfg)?;
                    crate::policy::Grants::open(&cfg.access.grants, &keyring)
                        .map_err(|e| format!("grants: {e}"))?
                }
                Some(k) => {
                    eprintln!(
                        "note: no keyring at {}: grants are not considered",
                        k.path.display()
                    );
                    crate::policy::Grants::disabled()
                }
                None => crate::policy::Grants::for_proxy(&cfg.access.grants, None)
                    .map_err(|e| format!("grants: {e}"))?,
            };
            let policies = crate::policy::Policies::new(&cfg.access.key_policies, Arc::new(grants));
            match policies.evaluate(&p, &key, action, &ctx, &[]) {
                crate::policy::Decision::Allow(basis) => {
                    println!("allow ({basis})");
                    Ok(())
                }
                crate::policy::Decision::Deny(d) => {
                    println!(
                        "deny ({}): {d}",
                        match &d.statement {
                            Some(s) => format!("statement {s} denies"),
                            None => "no statement allows it".into(),
                        }
                    );
                    Err("denied".into())
                }
            }
        }
        Command::Keys { action } => {
            let cfg = load(&cli.config)?;
            if matches!(
                action,
                KeysAction::Rewrap { .. }
                    | KeysAction::Shred { .. }
                    | KeysAction::VaultExport { .. }
            ) {
                return vault_command(&cfg, action, unix_now()).await;
            }
            if let KeysAction::AcceptGeneration { generation } = action {
                // The keyring cannot be opened normally: that is why this command exists.
                let settings = keyring_settings(&cfg)?;
                Keyring::accept_generation(&settings.path, &settings.master_key, generation)
                    .map_err(|e| e.to_string())?;
                println!(
                    "{}: generation {generation} accepted; restart running proxies to load it",
                    settings.path.display()
                );
                return Ok(());
            }
            let keyring = open_keyring(&cfg)?;
            // What is due now (a deletion date passed, material expired, a rotation) first.
            let now = unix_now();
            match keyring.apply_due(now) {
                Ok(done) => done.iter().for_each(|line| eprintln!("{line}")),
                // A read-only keyring: show and change what can be, say what is pending.
                Err(e) => eprintln!("warning: scheduled key changes not applied: {e}"),
            }
            keys_command(&keyring, action, now)
        }
        Command::Grants { action } => {
            let cfg = load(&cli.config)?;
            let keyring = crate::keys::open_keyring(&cfg)?;
            let grants = crate::policy::Grants::for_proxy(&cfg.access.grants, keyring.as_deref())?;
            grants_command(&grants, action)
        }
        Command::Decrypt {
            route,
            context,
            field,
            vault_export,
        } => {
            let cfg = load(&cli.config)?;
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .map_err(|e| format!("reading stdin: {e}"))?;
            let out = decrypt_offline(
                &cfg,
                route.as_deref(),
                context.into_iter().collect(),
                field.as_deref(),
                vault_export.as_deref(),
                &input,
            )
            .await?;
            println!("{out}");
            Ok(())
        }
        Command::DecryptObject {
            route,
            context,
            metadata,
            bucket,
            key,
        } => {
            let cfg = load(&cli.config)?;
            let meta = std::fs::read_to_string(&metadata)
                .map_err(|e| format!("{}: {e}", metadata.display()))?;
            let given: HashMap<String, String> = context.into_iter().collect();
            let n = crate::s3::offline::decrypt_object(
                &cfg,
                route.as_deref(),
                &given,
                bucket.as_deref().zip(key.as_deref()),
                &meta,
                std::io::stdin().lock(),
                std::io::stdout().lock(),
            )
            .await?;
            eprintln!("decrypted {n} bytes");
            Ok(())
        }
        Command::AuditVerify { file, checkpoints } => {
            // The key comes from the configuration; an unkeyed (old) log verifies without it.
            let key = match load(&cli.config) {
                Ok(cfg) => Some(crate::audit::key_of(
                    &cfg,
                    crate::keys::open_keyring(&cfg)?.as_deref(),
                )?),
                Err(e) => {
                    eprintln!("no audit key ({e}); only unkeyed lines can be checked");
                    None
                }
            };
            let local = crate::audit::checkpoint_path(&file);
            let checkpoints = checkpoints.or_else(|| local.exists().then_some(local));
            let r = crate::audit::verify(&file, key.as_ref(), checkpoints.as_deref())?;
            println!(
                "{}: {} lines, keyed chain intact (sequence 1..{})",
                file.display(),
                r.keyed,
                r.last_seq
            );
            if let Some(cp) = &checkpoints {
                println!(
                    "{}: {} checkpoints verified; the log holds every line up to sequence {}",
                    cp.display(),
                    r.checkpoints,
                    r.checkpoint_seq
                );
            } else {
                println!("no checkpoints given: lines cut off the end would not show");
            }
            if r.unkeyed > 0 {
                println!(
                    "warning: {} unkeyed lines before the keyed chain (written by an older \
                     version): their SHA-256 chain is intact, but anyone can recompute it",
                    r.unkeyed
                );
            }
            Ok(())
        }
    }
}

fn grants_command(grants: &crate::policy::Grants, action: GrantsAction) -> Result<(), String> {
    use crate::config::Action;
    use crate::policy::grants::{Constraints, NewGrant};
    let key_ref = |k: &str| {
        KeyRef::parse(k)
            .ok_or_else(|| format!("{k:?} is not a key like \"name\" or \"backend:key\""))
    };
    let json =
        |g: &crate::policy::grants::Grant| serde_json::to_string(g).map_err(|e| e.to_string());
    match action {
        GrantsAction::Create {
            key,
            grantee,
            operations,
            equals,
            subset,
            retiring_principal,
            expires_in_secs,
        } => {
            let operations = operations
                .iter()
                .map(|o| Action::parse(o.trim()).ok_or_else(|| format!("{o:?} is not an action")))
                .collect::<Result<Vec<_>, _>>()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let new = NewGrant {
                key: key_ref(&key)?,
                grantee,
                operations,
                constraints: Constraints {
                    equals: (!equals.is_empty()).then(|| equals.into_iter().collect()),
                    subset: (!subset.is_empty()).then(|| subset.into_iter().collect()),
                },
                retiring_principal,
                expires_at: expires_in_secs.map(|s| now.saturating_add(s)),
            };
            let by = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            );
            let (g, token) = grants.create(new, &by).map_err(|e| e.to_string())?;
            println!("grant_id {}", g.id);
            println!("grant_token {token}");
        }
        GrantsAction::List { key, grantee } => {
            let key = key.as_deref().map(key_ref).transpose()?;
            for g in grants
                .list(key.as_ref(), grantee.as_deref())
                .map_err(|e| e.to_string())?
            {
                println!("{}", json(&g)?);
            }
        }
        GrantsAction::Retire { id, principal } => {
            let g = grants.retire(&id, &principal).map_err(|e| e.to_string())?;
            println!("retired {} ({} on {})", g.id, g.grantee, g.key);
        }
        GrantsAction::Revoke { id } => {
            let g = grants.revoke(&id).map_err(|e| e.to_string())?;
            println!("revoked {} ({} on {})", g.id, g.grantee, g.key);
        }
    }
    Ok(())
}

/// `keys rewrap | shred | vault-export`: the records of a v2 route's vault.
async fn vault_command(cfg: &Config, action: KeysAction, now: u64) -> Result<(), String> {
    use crate::keys::vault::manage;
    let route_name = match &action {
        KeysAction::Rewrap { route, .. }
        | KeysAction::Shred { route, .. }
        | KeysAction::VaultExport { route, .. } => route.clone(),
        _ => return Err("not a vault command".into()),
    };
    let route = cfg
        .routes
        .iter()
        .find(|r| r.name == route_name)
        .ok_or_else(|| format!("no route named {route_name:?}"))?;
    let (jr, kv) = match &route.kind {
        RouteKind::JsonFields(jr) => match &jr.key_vault {
            Some(kv) => (jr, kv),
            None => return Err(format!("route {route_name:?} has no key_vault")),
        },
        _ => return Err(format!("route {route_name:?} is not a JSON-fields route")),
    };
    let vault = crate::keys::vault::open(kv, &route.upstream, &cfg.server)?;
    match action {
        KeysAction::Rewrap { force, from, .. } => {
            let (_, backends) = crate::keys::connect_backends(cfg).await?;
            let keys = KeyService::new(backends, cfg.cache.clone(), Arc::new(Metrics::new()));
            let mut names: Vec<&str> = jr.key_context.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            let scope = manage::RewrapScope {
                route_keys: &jr.keys,
                from: &from,
                context_names: &names,
            };
            let r = manage::rewrap(&keys, &vault, &scope, force)
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{}: {} records rewrapped, {} already current, {} changed meanwhile, {} failed, \
                 {} left alone (another key context's names, or no wrapped key under the \
                 route's keys{})",
                vault.label(),
                r.rewrapped,
                r.current,
                r.conflicts,
                r.failed.len(),
                r.skipped,
                if from.is_empty() {
                    "; --from KEY opens others"
                } else {
                    " or --from"
                },
            );
            for f in &r.failed {
                eprintln!("failed: {f}");
            }
            if r.failed.is_empty() && r.conflicts == 0 {
                Ok(())
            } else {
                Err("some records were not rewrapped; run again".into())
            }
        }
        KeysAction::Shred {
            context,
            days,
            cancel,
            apply_due,
            ..
        } => {
            if apply_due {
                let deleted = manage::apply_due_shreds(&vault, now).await?;
                println!("{}: {} records shredded", vault.label(), deleted.len());
                for id in deleted {
                    println!("shredded {id}");
                }
                return Ok(());
            }
            let mut ctx = crate::envelope::Context::new();
            for (k, v) in context {
                ctx.insert(k, v);
            }
            let mut names: Vec<&str> = jr.key_context.iter().map(|(n, _)| n.as_str()).collect();
            names.sort();
            let given: Vec<&str> = ctx.iter().map(|(k, _)| k).collect();
            if names != given {
                return Err(format!(
                    "--context must name exactly the route's key context: {}",
                    names.join(", ")
                ));
            }
            let r = if cancel {
                manage::cancel_shred(&vault, &ctx).await
            } else {
                manage::schedule_shred(&vault, &ctx, days, now).await
            }
            .map_err(|e| e.to_string())?;
            match r.shred_after {
                Some(t) => println!(
                    "{} records scheduled for shredding after {} (cancel with --cancel)",
                    r.records.len(),
                    crate::keys::keyring::date(t)
                ),
                None => println!("{} records back in use", r.records.len()),
            }
            Ok(())
        }
        KeysAction::VaultExport { out, .. } => {
            let export = manage::export(&vault).await.map_err(|e| e.to_string())?;
            let text = serde_json::to_string_pretty(&export).map_err(|e| e.to_string())?;
            std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "{}: {} records written to {}",
                vault.label(),
                export.records.len(),
                out.display()
            );
            Ok(())
        }
        _ => Err("not a vault command".into()),
    }
}

/// Decrypt `input` (a token or a stored document) as `route` would on a read.
pub async fn decrypt_offline(
    cfg: &Config,
    route: Option<&str>,
    given: HashMap<String, String>,
    field: Option<&str>,
    vault_export: Option<&std::path::Path>,
    input: &str,
) -> Result<String, String> {
    let encrypting: Vec<_> = cfg
        .routes
        .iter()
        .filter_map(|r| match &r.kind {
            RouteKind::JsonFields(jr) => Some((r, jr)),
            RouteKind::Passthrough | RouteKind::S3(_) => None,
        })
        .collect();
    let (r, jr) = match route {
        Some(name) => encrypting
            .iter()
            .find(|(r, _)| r.name == name)
            .ok_or_else(|| format!("no encrypting route named {name:?}"))?,
        None if encrypting.len() == 1 => &encrypting[0],
        None => return Err("several encrypting routes: choose one with --route".into()),
    };
    let (_, backends) = crate::keys::connect_backends(cfg).await?;
    let keys = KeyService::new(backends, cfg.cache.clone(), Arc::new(Metrics::new()));
    // v2 tokens: their records come from the export given, else from the route's vault.
    match (vault_export, &jr.key_vault, &jr.vault_label) {
        (Some(path), _, label) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let export: crate::keys::vault::manage::Export =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let label = label.clone().unwrap_or_else(|| export.vault.clone());
            let mut jr_export = None;
            if jr.vault_label.is_none() {
                // A route without a vault (format v1 now): read with the export's label.
                let mut j = (*jr).clone();
                j.vault_label = Some(label.clone());
                jr_export = Some(j);
            }
            keys.register_vault(crate::keys::vault::manage::ExportVault::new(label, export)?);
            if let Some(j) = jr_export {
                return decrypt_with(&j, &keys, given, field, input).await;
            }
        }
        (None, Some(kv), _) => {
            keys.register_vault(crate::keys::vault::open(kv, &r.upstream, &cfg.server)?);
        }
        (None, None, _) => {}
    }
    decrypt_with(jr, &keys, given, field, input).await
}

async fn decrypt_with(
    jr: &crate::config::JsonRoute,
    keys: &KeyService,
    given: HashMap<String, String>,
    field: Option<&str>,
    input: &str,
) -> Result<String, String> {
    let captures = HashMap::new();
    let headers = http::HeaderMap::new();
    let meta = RequestMeta {
        captures: &captures,
        headers: &headers,
        given: Some(&given),
        principal: None,
    };
    let key_ctx = json_fields::key_context(jr, &meta).map_err(|e| e.to_string())?;
    let trimmed = input.trim();
    let bare = trimmed.trim_matches('"');
    let (mut doc, single) = if bare.starts_with(crate::envelope::token::PREFIX)
        || bare.starts_with(crate::envelope::compact::PREFIX)
    {
        // A bare token: wrap it as the one field it was sealed under.
        let path = match field {
            Some(f) => f.to_string(),
            None if jr.fields.len() == 1 => jr.fields[0].source().to_string(),
            None => {
                return Err(
                    "a bare token needs --field (the configured path it was sealed under)".into(),
                );
            }
        };
        let fp = jr
            .fields
            .iter()
            .find(|f| f.source() == path)
            .ok_or_else(|| format!("{path:?} is not a field of this route"))?;
        (
            single_field_doc(fp.source(), bare)?,
            Some(fp.source().to_string()),
        )
    } else {
        (
            crate::transform::strict_json::parse(trimmed.as_bytes(), 128)
                .map_err(|e| e.to_string())?,
            None,
        )
    };
    let mut jr_one = (*jr).clone();
    if let Some(path) = &single {
        jr_one.fields.retain(|f| f.source() == path);
    }
    json_fields::open_body(&jr_one, &meta, &key_ctx, keys, &mut doc)
        .await
        .map_err(|e| match e {
            crate::error::ProxyError::DecryptFailed(f, place) => {
                format!("does not decrypt ({place}): {f}")
            }
            other => other.to_string(),
        })?;
    let out = match single {
        Some(path) => extract_single(&path, &doc),
        None => doc,
    };
    serde_json::to_string_pretty(&out).map_err(|e| e.to_string())
}

/// For a bare token under a simple path like `$.a.b`, build `{"a": {"b": token}}`.
fn single_field_doc(path: &str, token: &str) -> Result<serde_json::Value, String> {
    let names = simple_names(path).ok_or_else(|| {
        format!("{path:?}: bare tokens are supported for simple dotted paths; decrypt the whole document instead")
    })?;
    let mut v = serde_json::Value::String(token.to_string());
    for n in names.iter().rev() {
        v = serde_json::json!({ n.clone(): v });
    }
    Ok(v)
}

fn extract_single(path: &str, doc: &serde_json::Value) -> serde_json::Value {
    let mut v = doc;
    for n in simple_names(path).unwrap_or_default() {
        v = &v[n.as_str()];
    }
    v.clone()
}

fn simple_names(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix("$.")?;
    let names: Vec<String> = rest.split('.').map(str::to_string).collect();
    names
        .iter()
        .all(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
        })
        .then_some(names)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn keys_command(keyring: &Keyring, action: KeysAction, now: u64) -> Result<(), String> {
    use crate::keys::keyring::{date, parse_date};
    let e = |e: crate::keys::keyring::KeyringError| e.to_string();
    match action {
        KeysAction::List => {
            println!(
                "{:<32} {:<16} {:>7} {:>8}  CREATED",
                "NAME", "STATE", "CURRENT", "VERSIONS"
            );
            for k in keyring.list() {
                println!(
                    "{:<32} {:<16} {:>7} {:>8}  {}",
                    k.name,
                    k.state.name(),
                    k.current_version,
                    k.versions,
                    date(k.created)
                );
            }
        }
        KeysAction::Create { name, origin } => {
            if origin == "external" {
                keyring.create_external(&name).map_err(e)?;
                println!(
                    "created {name} (pending import): run `keys import-params {name} --out DIR`"
                );
            } else {
                let k = keyring.create_key(&name).map_err(e)?;
                println!("created {} (version {})", k.name, k.current_version);
            }
        }
        KeysAction::Describe { name, json } => {
            let info = keyring.describe(&name).map_err(e)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).map_err(|e| e.to_string())?
                );
            } else {
                println!("name:            {}", info.name);
                println!("state:           {}", info.state.name());
                println!("origin:          {}", info.origin);
                println!("created:         {}", info.created);
                if !info.aliases.is_empty() {
                    println!("aliases:         {}", info.aliases.join(", "));
                }
                if let Some(v) = info.current_version {
                    println!("current version: {v}");
                }
                for v in &info.versions {
                    println!(
                        "  version {:<4} created {}  last used {}",
                        v.version,
                        v.created,
                        v.last_used.as_deref().unwrap_or("never")
                    );
                }
                let opt = |label: &str, v: &Option<String>| {
                    if let Some(v) = v {
                        println!("{label:<16} {v}");
                    }
                };
                if let Some(d) = info.rotation_period_days {
                    println!("rotation:        every {d} days");
                }
                opt("next rotation:", &info.next_rotation);
                opt("deletion date:", &info.deletion_date);
                opt("destroyed:", &info.destroyed);
                opt("material expires:", &info.material_expires);
                opt("import params until:", &info.import_parameters_valid_until);
                println!(
                    "last used:       {}",
                    info.last_used.as_deref().unwrap_or("never")
                );
            }
        }
        KeysAction::Disable { name } => {
            let k = keyring.set_enabled(&name, false).map_err(e)?;
            println!(
                "disabled {}: data under it cannot be read until `keys enable {}`",
                k.name, k.name
            );
        }
        KeysAction::Enable { name } => {
            let k = keyring.set_enabled(&name, true).map_err(e)?;
            println!("enabled {}", k.name);
        }
        KeysAction::Rotate { name } => {
            let k = keyring.rotate_key(&name).map_err(e)?;
            println!(
                "rotated {}: new writes use version {}; versions 1..{} still decrypt",
                k.name, k.current_version, k.current_version
            );
        }
        KeysAction::SetRotation { name, days, off } => {
            let days = if off { None } else { days };
            keyring.set_rotation(&name, days).map_err(e)?;
            match days {
                Some(d) => println!("{name} rotates every {d} days"),
                None => println!("{name}: automatic rotation off"),
            }
        }
        KeysAction::ScheduleDeletion { name, days } => {
            let when = keyring.schedule_deletion(&name, days, now).map_err(e)?;
            println!(
                "{name} is pending deletion: it neither encrypts nor decrypts from now on, and                  its material is destroyed on {} (data under it is then unrecoverable). Every                  attempt to use it meanwhile is refused and counted                  (envelope_proxy_key_state_refusals_total): if that alarm fires, data still                  needs the key: `keys cancel-deletion {name}`",
                date(when)
            );
        }
        KeysAction::CancelDeletion { name } => {
            let state = keyring.cancel_deletion(&name).map_err(e)?;
            println!(
                "{name}: deletion cancelled; the key is {} ({})",
                state.name(),
                state.hint()
            );
        }
        KeysAction::ImportParams { name, out } => {
            let p = keyring.import_params(&name, now).map_err(e)?;
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let pem = out.join("wrapping-key.pem");
            let token = out.join("import-token.bin");
            std::fs::write(&pem, &p.public_pem).map_err(|e| format!("{}: {e}", pem.display()))?;
            std::fs::write(&token, &p.token).map_err(|e| format!("{}: {e}", token.display()))?;
            println!(
                "wrote {} and {} (valid until {}). Wrap 32 bytes of key material with:\n  \
                 openssl pkeyutl -encrypt -pubin -inkey {} -pkeyopt rsa_padding_mode:oaep \
                 -pkeyopt rsa_oaep_md:sha256 -in key.bin -out wrapped.bin\nthen: \
                 envelope-proxy keys import {name} --material wrapped.bin --token {}",
                pem.display(),
                token.display(),
                date(p.expires),
                pem.display(),
                token.display()
            );
        }
        KeysAction::Import {
            name,
            material,
            token,
            expires,
        } => {
            let wrapped =
                std::fs::read(&material).map_err(|e| format!("{}: {e}", material.display()))?;
            let token_bytes =
                std::fs::read(&token).map_err(|e| format!("{}: {e}", token.display()))?;
            let expires = expires.as_deref().map(parse_date).transpose().map_err(e)?;
            keyring
                .import(&name, &wrapped, &token_bytes, expires, now)
                .map_err(e)?;
            match expires {
                Some(t) => println!("imported key material into {name} (expires {})", date(t)),
                None => println!("imported key material into {name}"),
            }
        }
        KeysAction::Alias { action } => match action {
            AliasAction::Create { alias, key } => {
                keyring.set_alias(&alias, &key, false).map_err(e)?;
                println!("{alias} -> {key}");
            }
            AliasAction::Update { alias, key } => {
                keyring.set_alias(&alias, &key, true).map_err(e)?;
                println!(
                    "{alias} -> {key}: new writes use {key}; data under the previous key still decrypts"
                );
            }
            AliasAction::Delete { alias } => {
                keyring.delete_alias(&alias).map_err(e)?;
                println!("deleted {alias}");
            }
            AliasAction::List => {
                for (alias, key) in keyring.aliases() {
                    println!("{alias:<40} {key}");
                }
            }
        },
        KeysAction::RetireVersion {
            name,
            version,
            unused_days,
        } => {
            keyring
                .retire_version(&name, version, unused_days * crate::keys::keyring::DAY, now)
                .map_err(e)?;
            println!(
                "retired version {version} of {name}: data still under it can no longer be read"
            );
        }
        KeysAction::Usage {
            name,
            version,
            audit,
            json,
        } => crate::reencrypt::usage::command(keyring, &name, version, audit.as_deref(), json)?,
        KeysAction::AcceptGeneration { .. }
        | KeysAction::Rewrap { .. }
        | KeysAction::Shred { .. }
        | KeysAction::VaultExport { .. } => {}
    }
    Ok(())
}
