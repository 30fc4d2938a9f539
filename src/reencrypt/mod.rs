//! `envelope-proxy reencrypt`: rewrite stored values that are not sealed under the current
//! version of their route's root keys, **through the proxy's own routes** (so the same key
//! context, policies and authentication apply), so old key versions can be retired.
//!
//! - Values are judged by their envelope header, read raw from the store: a JSON token's
//!   header ([`crate::envelope::token`]), an S3 object's `x-amz-meta-ep-envelope`. A value is
//!   stale when an EDK of a key the route uses names an older version, or another key than the
//!   one the route names now ([`crate::keys::currency`]).
//! - JSON routes ([`json`]): each stale document is read through the proxy (plaintext) and
//!   written back through it (PUT, or PATCH of the sealed members), conditionally; then read
//!   back raw and through the proxy and compared.
//! - S3 routes ([`s3`]): each stale object is copied onto itself through the gateway, which
//!   re-seals a copy onto itself unless the object is already current (src/s3/copy.rs).
//!
//! Progress bar on a terminal, one JSON summary line otherwise; a checkpoint file to resume;
//! bounded concurrency and write rate. Exit status: 0 done, 1 errors, 2 conflicts left.

pub mod checkpoint;
pub mod json;
pub mod s3;
pub mod usage;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Route};
use crate::envelope::Header;
use crate::keys::KeyService;
use crate::keys::currency::CurrentVersions;
use crate::pipeline::upstream::UpstreamClient;

/// `envelope-proxy reencrypt` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The route whose stored data is walked.
    #[arg(long)]
    pub route: String,
    /// JSON routes: the collection path (one the route serves), e.g. /tenants/acme/users.
    #[arg(long, conflicts_with = "bucket")]
    pub collection: Option<String>,
    /// JSON routes: a file of record ids (one per line) instead of paging the collection.
    #[arg(long, requires = "collection")]
    pub ids: Option<PathBuf>,
    /// JSON routes: the store's page-number query parameter.
    #[arg(long, default_value = "_page")]
    pub page_param: String,
    /// JSON routes: the store's page-size query parameter.
    #[arg(long, default_value = "_limit")]
    pub limit_param: String,
    /// JSON routes: the page size.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// JSON routes: the member holding a record's id.
    #[arg(long, default_value = "id")]
    pub id_field: String,
    /// JSON routes: write back with PATCH of the sealed members only (default: PUT).
    #[arg(long)]
    pub patch: bool,
    /// S3 routes: the bucket.
    #[arg(long, conflicts_with = "collection")]
    pub bucket: Option<String>,
    /// S3 routes: only keys under this prefix.
    #[arg(long, requires = "bucket")]
    pub prefix: Option<String>,
    /// S3 routes: the client access key id to sign with (default: the route's first client).
    #[arg(long)]
    pub access_key_id: Option<String>,
    /// S3 routes: the environment variable holding that client's secret access key (default:
    /// the secret the config names for it).
    #[arg(long)]
    pub secret_access_key_env: Option<String>,
    /// The running proxy (default: http://[server] listen).
    #[arg(long)]
    pub proxy: Option<String>,
    /// A header sent to the proxy, NAME:VALUE (repeatable; e.g. the route's bearer token).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Read only: count values by key and version, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Checkpoint file: continue after the last item it records, and keep it up to date.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write the checkpoint every N completed items.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: u64,
    /// Items handled at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// At most N writes per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop after N items (the checkpoint says where; run again with --resume to go on).
    #[arg(long)]
    pub max_items: Option<u64>,
    /// Testing: wait this long between reading a stale value and checking it is unchanged.
    #[arg(long, hide = true, default_value_t = 0)]
    pub pause_before_write_ms: u64,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (n, v) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:VALUE, got {:?}", s.split(':').next()))?;
    http::HeaderName::from_bytes(n.trim().as_bytes()).map_err(|e| e.to_string())?;
    http::HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?;
    Ok((n.trim().to_string(), v.trim().to_string()))
}

/// What a run saw and did (the JSON summary line, and the checkpoint's counts).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub route: String,
    pub scanned: u64,
    pub stale: u64,
    pub rewritten: u64,
    pub conflicts: u64,
    pub errors: u64,
    /// Values by `key:version` of their EDKs (every key a value names, route's or not).
    pub by_version: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stopped_early: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Summary {
    pub fn exit_code(&self) -> ExitCode {
        if self.errors > 0 {
            ExitCode::from(1)
        } else if self.conflicts > 0 {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Under the current versions already (or `--dry-run`).
    Current,
    /// Stale, left as it is (`--dry-run`).
    WouldRewrite,
    Rewritten,
    /// Changed by someone else between the read and the write: left for the next run.
    Conflict(String),
    Error(String),
}

/// One item's result: the `key:version`s of the values it held, stale or not, and what was done.
#[derive(Debug)]
pub struct ItemResult {
    pub id: String,
    pub versions: Vec<String>,
    pub stale: bool,
    pub outcome: Outcome,
}

/// Everything the walkers share.
pub struct Run {
    pub args: Args,
    pub config: Config,
    pub route: Route,
    pub keys: Arc<KeyService>,
    pub current: CurrentVersions,
    pub client: UpstreamClient,
    pub proxy: String,
    limiter: Option<Mutex<Instant>>,
}

impl Run {
    /// Whether a stored value's header is current; its EDKs as `key:version` strings.
    pub fn judge(&self, header: &Header) -> (bool, Vec<String>) {
        let names = header
            .edks
            .iter()
            .map(|e| format!("{}:{}", e.key_id, e.key_version))
            .collect();
        (self.keys.is_current(header, &self.current), names)
    }

    /// Wait for a write slot under `--rate`.
    pub async fn write_slot(&self) {
        let Some(limiter) = &self.limiter else { return };
        let Some(rate) = self.args.rate.filter(|r| *r > 0.0) else {
            return;
        };
        let wait = {
            let mut next = limiter.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + Duration::from_secs_f64(1.0 / rate);
            at - now
        };
        tokio::time::sleep(wait).await;
    }

    /// Send a request (to the store or the proxy) and read the whole answer.
    pub async fn send(
        &self,
        req: http::Request<crate::body::ProxyBody>,
    ) -> Result<(http::response::Parts, Bytes), String> {
        let what = format!("{} {}", req.method(), redact_query(req.uri()));
        let resp = self
            .client
            .send(req)
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(self.client.timeout(), body.collect())
            .await
            .map_err(|_| format!("{what}: timed out reading the body"))?
            .map_err(|e| format!("{what}: {e}"))?
            .to_bytes();
        Ok((parts, body))
    }
}

/// A URI for messages: path only (query strings can carry tokens).
fn redact_query(uri: &http::Uri) -> String {
    format!(
        "{}{}",
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

/// Run `reencrypt` with the configuration at `config_path`.
pub async fn main(config_path: &std::path::Path, args: Args) -> ExitCode {
    match run(config_path, args).await {
        Ok(summary) => summary.exit_code(),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config_path: &std::path::Path, args: Args) -> Result<Summary, String> {
    let config =
        crate::config::load(config_path).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let route = config
        .routes
        .iter()
        .find(|r| r.name == args.route)
        .cloned()
        .ok_or_else(|| format!("no route named {:?}", args.route))?;
    let (_, backends) = crate::keys::connect_backends(&config).await?;
    let keys = KeyService::new(
        backends,
        config.cache.clone(),
        Arc::new(crate::metrics::Metrics::new()),
    );
    let current = keys
        .current_versions(route.kind.keys())
        .await
        .map_err(|e| format!("route {}: {e}", route.name))?;
    let proxy = match &args.proxy {
        Some(p) => p.trim_end_matches('/').to_string(),
        None => match config.server.listen {
            Some(l) if config.server.tls.is_some() => format!("https://{l}"),
            Some(l) => format!("http://{l}"),
            None => return Err("the proxy listens on no TCP address: give --proxy".into()),
        },
    };
    let client = UpstreamClient::new(&config.server)?;
    let limiter = args.rate.map(|_| Mutex::new(Instant::now()));
    let target = match (&args.collection, &args.bucket, &route.kind) {
        (Some(c), None, crate::config::RouteKind::JsonFields(_)) => format!("json:{c}"),
        (None, Some(b), crate::config::RouteKind::S3(_)) => {
            format!("s3:{b}/{}", args.prefix.as_deref().unwrap_or(""))
        }
        (_, _, crate::config::RouteKind::JsonFields(_)) => {
            return Err(format!(
                "route {} is a JSON route: give --collection",
                route.name
            ));
        }
        (_, _, crate::config::RouteKind::S3(_)) => {
            return Err(format!(
                "route {} is an S3 route: give --bucket",
                route.name
            ));
        }
        (_, _, crate::config::RouteKind::Passthrough) => {
            return Err(format!("route {} encrypts nothing", route.name));
        }
    };
    // A dry run's checkpoint must not make a real run skip what it only counted.
    let target = if args.dry_run {
        format!("{target} (dry run)")
    } else {
        target
    };
    let run = Arc::new(Run {
        args,
        config,
        route,
        keys,
        current,
        client,
        proxy,
        limiter,
    });
    let mut progress = Progress::start(&run, target)?;
    let result = if run.args.bucket.is_some() {
        s3::walk(&run, &mut progress).await
    } else {
        json::walk(&run, &mut progress).await
    };
    progress.finish(result)
}

/// Counts, the checkpoint and what the operator sees.
pub struct Progress {
    pub summary: Summary,
    checkpoint: Option<(PathBuf, String)>,
    /// Items completed in this run (for `--checkpoint-every` and `--max-items`).
    done: u64,
    every: u64,
    max: Option<u64>,
    /// Continue after this item (from the checkpoint).
    pub after: Option<String>,
    last: Option<String>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(run: &Run, target: String) -> Result<Progress, String> {
        let mut summary = Summary {
            route: run.route.name.clone(),
            ..Summary::default()
        };
        let mut after = None;
        if let Some(path) = &run.args.resume
            && let Some(cp) = checkpoint::load(path)?
        {
            if cp.route != run.route.name || cp.target != target {
                return Err(format!(
                    "{}: a checkpoint of route {} over {}, not of this run",
                    path.display(),
                    cp.route,
                    cp.target
                ));
            }
            summary = cp.summary;
            summary.stopped_early = false;
            after = cp.last;
        }
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {pos}/{len} {wide_bar} {per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Ok(Progress {
            summary,
            checkpoint: run.args.resume.clone().map(|p| (p, target)),
            done: 0,
            every: run.args.checkpoint_every.max(1),
            max: run.args.max_items,
            last: after.clone(),
            after,
            bar,
        })
    }

    /// Items are known to exist this far (listing): the bar's length.
    pub fn listed(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc_length(n);
        }
    }

    /// Whether `--max-items` is reached (stop starting new items).
    pub fn full(&self) -> bool {
        self.max.is_some_and(|m| self.done >= m)
    }

    /// Record one completed item (in listing order).
    pub fn record(&mut self, item: ItemResult) -> Result<(), String> {
        let s = &mut self.summary;
        s.scanned += 1;
        for v in &item.versions {
            *s.by_version.entry(v.clone()).or_default() += 1;
        }
        if item.stale {
            s.stale += 1;
        }
        match &item.outcome {
            Outcome::Current | Outcome::WouldRewrite => {}
            Outcome::Rewritten => s.rewritten += 1,
            Outcome::Conflict(why) => {
                s.conflicts += 1;
                self.say(&format!("conflict: {}: {why}", item.id));
            }
            Outcome::Error(why) => {
                s.errors += 1;
                self.say(&format!("error: {}: {why}", item.id));
            }
        }
        self.last = Some(item.id);
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
            let s = &self.summary;
            bar.set_message(format!(
                "stale {} rewritten {} conflicts {} errors {}",
                s.stale, s.rewritten, s.conflicts, s.errors
            ));
        }
        if self.done.is_multiple_of(self.every) {
            self.save()?;
        }
        Ok(())
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn save(&self) -> Result<(), String> {
        let Some((path, target)) = &self.checkpoint else {
            return Ok(());
        };
        checkpoint::save(
            path,
            &checkpoint::Checkpoint {
                format: checkpoint::FORMAT.into(),
                route: self.summary.route.clone(),
                target: target.clone(),
                last: self.last.clone(),
                summary: self.summary.clone(),
            },
        )
    }

    fn finish(mut self, result: Result<(), String>) -> Result<Summary, String> {
        if self.full() {
            self.summary.stopped_early = true;
        }
        // A walk that went through: the checkpoint is removed, so the next run (for the
        // conflicts left) starts from the beginning. Otherwise it says where to go on.
        let saved = match (
            &self.checkpoint,
            self.summary.stopped_early || result.is_err(),
        ) {
            (Some((path, _)), false) => match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(format!("{}: {e}", path.display()))
                }
                _ => Ok(()),
            },
            _ => self.save(),
        };
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Err(e) = &result {
            // What was done so far is still worth saying (and the checkpoint keeps it).
            self.summary.errors += 1;
            eprintln!("error: {e}");
        }
        saved?;
        println!(
            "{}",
            serde_json::to_string(&self.summary).map_err(|e| e.to_string())?
        );
        Ok(self.summary)
    }
}

/// Run `f` over `items` with at most `--concurrency` at once, recording results in order
/// (so the checkpoint's last item has every earlier one done). Stops at `--max-items`.
pub async fn for_each_ordered<F, Fut>(
    run: &Arc<Run>,
    progress: &mut Progress,
    items: Vec<String>,
    f: F,
) -> Result<(), String>
where
    F: Fn(Arc<Run>, String) -> Fut,
    Fut: std::future::Future<Output = ItemResult> + Send + 'static,
{
    use futures_util::StreamExt;
    let room = progress
        .max
        .map(|m| m.saturating_sub(progress.done) as usize)
        .unwrap_or(usize::MAX);
    let items: Vec<String> = items.into_iter().take(room).collect();
    let mut results = futures_util::stream::iter(items.into_iter().map(|id| {
        let fut = f(run.clone(), id);
        async move { tokio::spawn(fut).await }
    }))
    .buffered(run.args.concurrency as usize);
    while let Some(r) = results.next().await {
        let item = r.map_err(|e| format!("a worker failed: {e}"))?;
        progress.record(item)?;
    }
    Ok(())
}
