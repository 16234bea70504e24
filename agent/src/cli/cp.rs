use std::path::{Path, PathBuf};

use agentwall::{
    config::control_plane::ClientConfig,
    control_plane::{
        Approval, Bundle, BundleFile, BundleInfo, FlowPage, FlowQuery, NodeInfo, NodeShadowAi,
        PolicyDiff, Proposal, PushRequest, Pushed, RevokeRequest, SimulateReply, SimulateRequest,
        UnusedReply,
        chain::ChainReport,
        client::{Client, ClientError},
    },
    flows::FlowRecord,
};
use anyhow::{Context as _, bail};

/// Where `agentwall cp` reads its settings when `--config` is not given.
const DEFAULT_CLIENT_CONFIG: &str = "/etc/agentwall/cp-client.toml";

#[derive(clap::Args)]
pub struct Args {
    /// TOML: url, ca, and cert + key or token_file. Flags override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The control plane's URL (https://HOST:PORT).
    #[arg(long, global = true)]
    url: Option<String>,
    /// CA bundle (PEM) the control plane's certificate must chain to.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) to sign in with, instead of a token.
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
    /// A file holding a bearer token (an admin's or a security reader's).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// text for a person, json for programs.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    output: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Policy bundles.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Nodes: last seen, applied revision, version.
    Nodes,
    /// Flows every node reported.
    Flows(Box<FlowArgs>),
    /// Shadow AI across nodes.
    ShadowAi {
        /// Only flows from this long ago on (30m, 24h) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Anomaly alerts raised over what nodes reported (the newest 1,000), and the
    /// thresholds that raise them.
    Alerts {
        /// Only alerts from this long ago on (30m, 24h) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Grant an identity temporary access on top of its policy: the newest bundle with a
    /// Grant file added, pushed as `policy push` pushes (the same signatures and approvals).
    /// Its rules end at the deadline in each node's kernel, whether or not the node runs.
    Grant {
        /// The SPIFFE ID given access (it must have an AgentPolicy).
        #[arg(long)]
        identity: String,
        /// A destination: an address, a CIDR or a name pattern. Repeatable.
        #[arg(long, required = true)]
        to: Vec<String>,
        /// A port or range (443, 8000-8100). Repeatable; none: any port.
        #[arg(long)]
        ports: Vec<String>,
        /// tcp or udp; none: both.
        #[arg(long)]
        protocol: Option<String>,
        /// How long it lasts (30m, 4h; at most 7d).
        #[arg(long = "for", value_name = "DURATION")]
        lasting: String,
        /// Why: kept with the grant for the review afterwards (1 to 1,024 characters).
        #[arg(long)]
        reason: String,
        /// Sign the bundle with this Ed25519 private key (PKCS#8 PEM), as `policy push
        /// --sign-key`. Repeatable.
        #[arg(long, value_name = "FILE")]
        sign_key: Vec<PathBuf>,
        /// An emergency: published and applied at once on the signatures the control
        /// plane's `break_glass_approvals` and the nodes' `break_glass_signatures` ask for
        /// (fewer than a bundle needs), at most 4 hours, flagged for review.
        #[arg(long)]
        break_glass: bool,
        #[command(flatten)]
        base: BaseCheck,
    },
    /// The grants in the newest bundle: in force, and ended but not yet pushed away.
    Grants,
    /// Revoke an identity on every node.
    Revoke {
        /// The SPIFFE ID to revoke.
        identity: String,
        /// Why, kept with the revocation (at most 1,024 characters).
        #[arg(long)]
        reason: Option<String>,
    },
    /// The issuer's join tokens and the certificates it signed (`[issuer]`).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// The audit chains of what nodes sent.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Reviews over every node's records.
    #[command(subcommand)]
    Report(ReportCommand),
    /// A one-time link that signs a browser in to the console with this command's own
    /// credential (good for ten minutes; whoever opens it first is signed in).
    ConsoleLink,
    /// End console sessions at once, on every replica: everyone's, or one principal's.
    EndSessions {
        /// Only this principal's: a SPIFFE ID, or `token:` and the first 12 hex digits of
        /// the token's SHA-256 (as the logs and `pushed_by` name it).
        #[arg(long)]
        principal: Option<String>,
    },
}

#[derive(clap::Subcommand)]
enum IdentityCommand {
    /// Mint a join token for IDENTITY: `agentwall launch --join-token` trades it, through
    /// an enrolled node, for a short-lived certificate the node then renews. The token is
    /// shown this once; the control plane keeps only its SHA-256.
    Token {
        /// The SPIFFE ID (in the issuer's trust domain).
        identity: String,
        /// How long the token lives (10m, 24h; at most 30d).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// How many certificates it can be traded for (at most 10,000).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Join tokens (never the tokens themselves): live ones, and ended ones for a day.
    Tokens,
    /// Cancel a join token, by its id as `tokens` lists it.
    Cancel {
        /// The token's id.
        id: String,
    },
    /// The certificates the issuer signed, newest first: each join and renewal, by node.
    Issued,
}

#[derive(clap::Subcommand)]
enum AuditCommand {
    /// Checks the records the control plane holds of a node's audit log: every record's
    /// hash, each one following the one before, no seq missing beyond what the node reported
    /// lost. Exit 1 when something is wrong.
    Verify {
        /// The node's SPIFFE ID (as `agentwall cp nodes` lists it).
        #[arg(long)]
        node: String,
    },
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Validate and push a policy directory (refused whole if anything in it is invalid).
    Push {
        /// Directory of *.yaml policy files.
        dir: PathBuf,
        /// The version this push was made from (see `policy show`): refused, with nothing
        /// stored, when another version was pushed since.
        #[arg(long)]
        base_version: Option<u64>,
        /// Sign the bundle with this Ed25519 private key (PKCS#8 PEM): one approval. With
        /// fewer than the control plane's `approvals_required`, the push is a proposal
        /// others approve. Repeatable.
        #[arg(long, value_name = "FILE")]
        sign_key: Vec<PathBuf>,
        /// Nodes refuse the bundle after this long (90s, 30m, 24h, 7d); signed with it.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// Leave out the grants in force in the newest bundle (`cp grants`) that the
        /// directory does not hold; by default they are carried over, so a push does not
        /// end them early.
        #[arg(long)]
        drop_grants: bool,
        #[command(flatten)]
        base: BaseCheck,
    },
    /// Sign a proposal with your key: the files are hashed here and must be what the
    /// proposal names. The approval that completes it publishes it.
    Approve {
        /// The proposal's number (`policy proposals`).
        id: u64,
        /// Your Ed25519 private key (PKCS#8 PEM).
        #[arg(long, value_name = "FILE")]
        sign_key: PathBuf,
        /// The whole SHA-256 of the files you reviewed, as `policy proposals --id N` shows
        /// it: nothing else is signed.
        #[arg(long, value_name = "HEX")]
        sha256: String,
        /// An admin's public key (SPKI PEM; the nodes' trusted_signers). Repeatable. A
        /// proposal is approved only when one of them signed it as it stands (its pusher's
        /// signature, over its files and its times): what a control plane made up, or
        /// re-dated, is not.
        #[arg(long, value_name = "FILE", required = true)]
        trusted_signer: Vec<PathBuf>,
    },
    /// Pushes awaiting approvals and those approved, newest first; --id N shows one with
    /// its files.
    Proposals {
        /// One proposal, with its files.
        #[arg(long)]
        id: Option<u64>,
    },
    /// The newest bundle (or --version N).
    Show {
        /// The bundle version to show.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Every stored version, newest first: who pushed it and when.
    Versions,
    /// What changed from one stored version to another, as unified diffs.
    Diff {
        /// The older version.
        from: u64,
        /// The newer version.
        to: u64,
    },
    /// Replay every node's recorded flows against a candidate policy directory (nothing is
    /// pushed): what would newly be denied or allowed. Fails when anything would newly be
    /// denied.
    Simulate {
        /// Directory of *.yaml policy files.
        dir: PathBuf,
        /// Only flows from this long ago on (30m, 24h, 7d) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Succeed even when flows would newly be denied.
        #[arg(long)]
        allow_new_denials: bool,
    },
}

#[derive(clap::Subcommand)]
enum ReportCommand {
    /// The newest bundle's rules no node recorded a flow for, by owner.
    Unused {
        /// Only flows from this long ago on (30m, 24h, 7d) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Every grant the bundles held, for the review afterwards: who pushed it, who signed
    /// it, its reason and deadline, and the flows it allowed.
    Grants {
        /// Only grants that ended this long ago or later (30m, 24h, 7d), or since an RFC
        /// 3339 time, and the flows since then.
        #[arg(long)]
        since: Option<String>,
    },
}

/// How files fetched from the control plane are checked before they are signed with yours:
/// as a node checks them, against the admins' keys.
#[derive(clap::Args)]
struct BaseCheck {
    /// An admin's public key (SPKI PEM) the newest bundle must be signed by before any of it
    /// is signed with --sign-key (the nodes' trusted_signers). Repeatable.
    #[arg(long, value_name = "FILE")]
    trusted_signer: Vec<PathBuf>,
    /// How many of them (default: all).
    #[arg(long, value_name = "N")]
    signatures_required: Option<u32>,
    /// How many suffice for a newest bundle that only adds break-glass grants to an older
    /// one that has all its signatures (the nodes' break_glass_signatures; default: none
    /// does).
    #[arg(long, value_name = "N")]
    break_glass_signatures: Option<u32>,
}

/// How many versions back a break-glass bundle's fully signed base is looked for.
const BREAK_GLASS_DEPTH: u64 = 32;

/// Checks `b`, fetched from the control plane, as a node would, before files of it are
/// signed with the admin's key: a control plane (or whoever holds its database) could
/// otherwise have the admin sign what it put there. A bundle short of its signatures passes
/// when `--break-glass-signatures` of them signed it and it only adds break-glass grants
/// to an older version that has them all.
async fn verified_base(c: &Client, b: &Bundle, check: &BaseCheck) -> anyhow::Result<()> {
    use agentwall::control_plane::signing::{Keyring, SigningError};
    if check.trusted_signer.is_empty() {
        bail!(
            "signing files of the control plane's newest bundle (version {}) needs --trusted-signer KEY (repeatable) to check them against first, as nodes do",
            b.version
        );
    }
    let keyring = Keyring::load_files(&check.trusted_signer)?;
    let required = check
        .signatures_required
        .map_or(keyring.len(), |n| n as usize);
    let now = time::OffsetDateTime::now_utc();
    let checked = |b: &Bundle, n: usize| -> anyhow::Result<agentwall::policy::source::PolicySet> {
        let set = agentwall::control_plane::validate(&b.files).map_err(|errors| {
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("version {} is invalid here:\n{}", b.version, all.join("\n"))
        })?;
        if set.revision != b.revision {
            bail!(
                "version {} names revision {}, but its files hash to {} here",
                b.version,
                b.revision,
                set.revision
            );
        }
        keyring
            .admit(&set.digest, &set.revision, &b.signing, n, None, now)
            .with_context(|| format!("version {} of the control plane", b.version))?;
        Ok(set)
    };
    let too_few = match checked(b, required) {
        Ok(_) => return Ok(()),
        Err(e)
            if e.downcast_ref::<SigningError>()
                .is_some_and(|s| matches!(s, SigningError::TooFew { .. })) =>
        {
            e
        }
        Err(e) => return Err(e),
    };
    let Some(n) = check.break_glass_signatures else {
        return Err(too_few);
    };
    let set = checked(b, n as usize).map_err(|_| too_few)?;
    // The newest fully signed version below it: the bundle must be it plus break-glass
    // grants, whatever came between.
    for v in (b.version.saturating_sub(BREAK_GLASS_DEPTH)..b.version).rev() {
        if v == 0 {
            break;
        }
        let older: Bundle = match c.get(&format!("/v1/policy?version={v}")).await {
            Ok(o) => o,
            Err(ClientError::Refused { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if checked(&older, required).is_err() {
            continue;
        }
        let before: Vec<(String, String)> =
            older.files.into_iter().map(|f| (f.name, f.text)).collect();
        return agentwall::policy::grant::break_glass_addition(&before, &set, now)
            .map(|_| ())
            .with_context(|| {
                format!(
                    "version {} has {n}+ signatures but fewer than {required}, and it is not version {v} (the newest with all of them) with break-glass grants added",
                    b.version
                )
            });
    }
    bail!(
        "version {} has fewer than {required} signatures, and none of the {BREAK_GLASS_DEPTH} versions before it has them all to judge it against",
        b.version
    )
}

/// Whether a file holds grants only, as `cp grant` writes them.
fn grants_only(text: &str) -> bool {
    text.split("\n---").all(|doc| {
        doc.trim_start_matches("---")
            .trim_start()
            .starts_with("kind: Grant\n")
    })
}

#[derive(clap::Args)]
struct FlowArgs {
    /// Only flows this node (its SPIFFE ID) reported.
    #[arg(long)]
    node: Option<String>,
    /// Only flows of this identity (SPIFFE ID).
    #[arg(long)]
    identity: Option<String>,
    /// deny | audit | unknown | socket-deny | allow
    #[arg(long)]
    verdict: Option<String>,
    /// A destination address.
    #[arg(long)]
    dest: Option<String>,
    /// Only flows to this AI service (as the catalog names it).
    #[arg(long)]
    service: Option<String>,
    /// Only flows of identities this owner answers for (as their policies name it).
    #[arg(long)]
    owner: Option<String>,
    /// From this long ago (30m, 24h) or an RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Before this long ago or an RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
    /// Records per page (default 100).
    #[arg(long)]
    limit: Option<u32>,
    /// Continue after this id (the `next` a page printed).
    #[arg(long)]
    after: Option<u64>,
    /// Every page, not just the first.
    #[arg(long)]
    all: bool,
    /// `decision` (default) or `loss` (records a node could not deliver, counted).
    #[arg(long)]
    kind: Option<String>,
    /// ocsf: OCSF 1.3.0 Network Activity events, one JSON object a line, for a SIEM.
    #[arg(long, value_parser = ["ocsf"])]
    format: Option<String>,
}

fn client(args: &Args) -> anyhow::Result<Client> {
    let file = match &args.config {
        Some(p) => ClientConfig::load(p)?,
        None if Path::new(DEFAULT_CLIENT_CONFIG).exists() => {
            ClientConfig::load(Path::new(DEFAULT_CLIENT_CONFIG))?
        }
        None => ClientConfig::default(),
    };
    let cfg = file.overlay(ClientConfig {
        url: args.url.clone(),
        urls: Vec::new(),
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        token_file: args.token_file.clone(),
        ..ClientConfig::default()
    });
    Ok(Client::new(&cfg)?)
}

/// `30m` ago or an RFC 3339 time, as RFC 3339.
fn when(s: &str) -> anyhow::Result<String> {
    if agentwall::clock::parse_rfc3339(s).is_ok() {
        return Ok(s.to_owned());
    }
    let d = agentwall::review::parse_duration(s)
        .with_context(|| format!("{s:?} is neither a duration (30m, 24h) nor an RFC 3339 time"))?;
    Ok(agentwall::clock::rfc3339(std::time::SystemTime::now() - d))
}

/// `cp flows --format ocsf`: events a line each, page after page with `all`.
async fn ocsf_flows(c: &Client, mut q: FlowQuery, all: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut not_mapped = 0u64;
    loop {
        let path = format!("/v1/flows?{}", serde_urlencoded::to_string(&q)?);
        let page: agentwall::control_plane::OcsfPage = c.get(&path).await?;
        let mut out = std::io::stdout().lock();
        for e in &page.events {
            serde_json::to_writer(&mut out, e)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        not_mapped += page.not_mapped;
        match page.next {
            Some(n) if all => q.after = Some(n),
            Some(n) => {
                eprintln!("more: --after {n}");
                break;
            }
            None => break,
        }
    }
    if not_mapped > 0 {
        eprintln!("{not_mapped} record(s) with no OCSF class here left out");
    }
    Ok(())
}

/// `base`, with `?since=` when one is given (a duration or a time, as [`when`] takes).
fn since_path(base: &str, since: Option<&str>) -> anyhow::Result<String> {
    Ok(match since {
        Some(s) => format!(
            "{base}?{}",
            serde_urlencoded::to_string([("since", when(s)?)])?
        ),
        None => base.to_owned(),
    })
}

fn print_chain(r: &ChainReport) {
    say!("node {}", r.node);
    match (&r.head, r.first_seq) {
        (Some(h), Some(first)) => say!(
            "{} record(s) held, seq {first} to {} (head {} at {})",
            r.records,
            h.seq,
            h.hash,
            h.time.as_deref().unwrap_or("?")
        ),
        _ => say!("no record of its audit chain held"),
    }
    for b in &r.breaks {
        say!("broken: seq {} (flow {}): {}", b.seq, b.id, b.problem);
    }
    if r.breaks_total > r.breaks.len() as u64 {
        say!("... {} more broken", r.breaks_total - r.breaks.len() as u64);
    }
    for g in &r.gaps {
        say!(
            "missing: {} record(s) between seq {} and seq {}",
            g.missing,
            g.after_seq,
            g.before_seq
        );
    }
    if r.missing > 0 {
        let lost: Vec<String> = r
            .reported_lost
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        say!(
            "{} seq(s) missing in all; the node reported lost: {}",
            r.missing,
            if lost.is_empty() {
                "nothing".to_owned()
            } else {
                lost.join(", ")
            }
        );
    }
    if r.unchained > 0 {
        say!(
            "{} record(s) held outside the chain; the node's log said it could not write {}",
            r.unchained,
            r.audit_write_failures
        );
    }
    if r.intact && r.records > 0 {
        say!("chain intact");
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// The policy files of a directory, as `load_dir` would read them.
/// (revision, whole SHA-256) of `files`, as a node computes them; an invalid bundle is an
/// error with each problem.
fn hashed(files: &[BundleFile]) -> anyhow::Result<(String, String)> {
    agentwall::control_plane::validate(files)
        .map(|set| (set.revision, set.digest))
        .map_err(|errors| {
            let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("the bundle is invalid:\n{}", all.join("\n"))
        })
}

/// The signing of a push: dated now, expiring after `expires_in`, adding grants to the
/// bundle valid from `adds_to` or carrying them over from the one valid from
/// `carries_from`, signed with each key.
fn sign_push(
    dir: &Path,
    files: &[BundleFile],
    keys: &[PathBuf],
    expires_in: Option<&str>,
    adds_to: Option<String>,
    carries_from: Option<String>,
) -> anyhow::Result<agentwall::control_plane::signing::Signing> {
    if keys.is_empty() && expires_in.is_none() {
        return Ok(Default::default());
    }
    let (_, digest) = hashed(files).with_context(|| format!("signing {}", dir.display()))?;
    let now = std::time::SystemTime::now();
    let expires_at = expires_in
        .map(|d| -> anyhow::Result<String> {
            Ok(agentwall::clock::rfc3339(
                now + agentwall::review::parse_duration(d)?,
            ))
        })
        .transpose()?;
    let mut signing = agentwall::control_plane::signing::Signing {
        not_before: Some(agentwall::clock::rfc3339(now)),
        expires_at,
        adds_to,
        carries_from,
        signatures: Vec::new(),
    };
    signing.signatures = keys
        .iter()
        .map(|k| agentwall::control_plane::signing::sign(k, &digest, &signing))
        .collect::<Result<_, _>>()?;
    Ok(signing)
}

async fn proposal(c: &Client, id: u64) -> anyhow::Result<Proposal> {
    let mut all: Vec<Proposal> = c.get(&format!("/v1/policy/proposals?id={id}")).await?;
    all.pop().with_context(|| format!("no proposal {id}"))
}

fn print_pushed(p: &Pushed, json: bool) {
    match p {
        Pushed::Bundle(b) if json => print_json(&serde_json::json!({
            "version": b.version, "revision": b.revision,
            "signatures": b.signing.signatures.len(),
        })),
        Pushed::Bundle(b) => println!(
            "published version {} revision {} ({} signature(s))",
            b.version,
            b.revision,
            b.signing.signatures.len()
        ),
        Pushed::Proposal {
            proposal,
            approvals_required,
        } if json => print_json(&serde_json::json!({
            "proposal": proposal.id, "revision": proposal.revision,
            "signatures": proposal.signing.signatures.len(),
            "approvals_required": approvals_required,
        })),
        Pushed::Proposal {
            proposal,
            approvals_required,
        } => println!(
            "proposal {} revision {}: {} of {approvals_required} signature(s); others approve it with `agentwall cp policy approve {} --sign-key KEY --sha256 HASH --trusted-signer PUB`",
            proposal.id,
            proposal.revision,
            proposal.signing.signatures.len(),
            proposal.id
        ),
    }
}

fn read_bundle(dir: &Path) -> anyhow::Result<Vec<BundleFile>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if !p.is_file() || !yaml {
            continue;
        }
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a UTF-8 file name", p.display()))?
            .to_owned();
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        files.push(BundleFile { name, text });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    if files.is_empty() {
        bail!("{}: no *.yaml or *.yml files to push", dir.display());
    }
    Ok(files)
}

/// The grant files in force in the newest bundle that `files` do not hold, and that bundle's
/// root ([`agentwall::control_plane::signing::Signing::root`]), which a signed push carrying
/// them names.
async fn grants_in_force(
    c: &Client,
    files: &[BundleFile],
    check: Option<&BaseCheck>,
) -> anyhow::Result<(Vec<BundleFile>, Option<String>)> {
    let b: Bundle = match c.get("/v1/policy").await {
        Ok(b) => b,
        Err(ClientError::Refused { status, .. }) if status == hyper::StatusCode::NOT_FOUND => {
            return Ok((Vec::new(), None));
        }
        Err(e) => return Err(e.into()),
    };
    let root = b.signing.root().map(str::to_owned);
    // Carried files are signed with the push: checked first, as a node checks them.
    if let Some(check) = check {
        if check.trusted_signer.is_empty() {
            if b.files.iter().any(|f| f.name.starts_with("grant-")) {
                eprintln!(
                    "not carrying grants over: a signed push carries them only once --trusted-signer keys confirm the newest bundle"
                );
            }
            return Ok((Vec::new(), None));
        }
        verified_base(c, &b, check).await?;
    }
    let Ok(set) = agentwall::control_plane::validate(&b.files) else {
        eprintln!(
            "not carrying grants over: the newest bundle (version {}) does not validate here",
            b.version
        );
        return Ok((Vec::new(), None));
    };
    let now = time::OffsetDateTime::now_utc();
    let carried: Vec<BundleFile> = b
        .files
        .into_iter()
        .filter(|f| {
            f.name.starts_with("grant-")
                && grants_only(&f.text)
                && !files.iter().any(|o| o.name == f.name)
                && set
                    .grants
                    .iter()
                    .filter(|g| g.origin.file.file_name() == Some(std::ffi::OsStr::new(&f.name)))
                    .all(|g| g.until > now)
                && set
                    .grants
                    .iter()
                    .any(|g| g.origin.file.file_name() == Some(std::ffi::OsStr::new(&f.name)))
        })
        .collect();
    Ok((carried, root))
}

async fn identity_command(
    c: &agentwall::control_plane::client::Client,
    cmd: &IdentityCommand,
    json: bool,
) -> anyhow::Result<()> {
    use agentwall::control_plane::{
        server::issuing::MintedToken,
        store::{Issuance, JoinToken},
    };
    let timeout = std::time::Duration::from_secs(30);
    match cmd {
        IdentityCommand::Token {
            identity,
            ttl,
            uses,
        } => {
            let ttl = agentwall::review::parse_duration(ttl)?;
            let t: MintedToken = c
                .send_json(
                    hyper::Method::POST,
                    "/v1/identity-tokens",
                    &serde_json::json!({
                        "identity": identity, "ttl_secs": ttl.as_secs(), "uses": uses,
                    }),
                    timeout,
                )
                .await?;
            if json {
                print_json(&t);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "join token {} for {}: {} use(s), until {} (shown once: the control plane keeps only its hash)",
                    t.id, t.identity, t.uses, t.expires
                );
            }
        }
        IdentityCommand::Tokens => {
            let list: Vec<JoinToken> = c.get("/v1/identity-tokens").await?;
            if json {
                print_json(&list);
            } else {
                for t in list {
                    println!(
                        "{}  {}  until {}  {} use(s) left{}  by {}",
                        t.id,
                        t.identity,
                        t.expires,
                        t.uses_left,
                        if t.cancelled { ", cancelled" } else { "" },
                        t.created_by
                    );
                }
            }
        }
        IdentityCommand::Cancel { id } => {
            let path = format!(
                "/v1/identity-tokens?{}",
                serde_urlencoded::to_string([("id", id)])?
            );
            let r: serde_json::Value = c.call(hyper::Method::DELETE, &path, None, timeout).await?;
            if json {
                print_json(&r);
            } else {
                println!("join token {id} cancelled");
            }
        }
        IdentityCommand::Issued => {
            let list: Vec<Issuance> = c.get("/v1/issuances").await?;
            if json {
                print_json(&list);
            } else {
                for i in list {
                    println!(
                        "{}  {}  {}  {} via {}  until {}",
                        i.issued, i.kind, i.identity, i.serial, i.node, i.not_after
                    );
                }
            }
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> anyhow::Result<()> {
    let c = client(&args)?;
    let json = args.output == "json";
    match &args.command {
        Command::Policy(PolicyCommand::Push {
            dir,
            base_version,
            sign_key,
            expires_in,
            drop_grants,
            base,
        }) => {
            let mut files = read_bundle(dir)?;
            // Signed with the root of the bundle grants are carried from: a node that
            // stands on a newer one refuses the push, so an old bundle shown as the newest
            // cannot bring back grants ended since.
            let mut carries_from = None;
            if !drop_grants {
                let check = (!sign_key.is_empty()).then_some(base);
                let (carried, root) = grants_in_force(&c, &files, check).await?;
                if !carried.is_empty() {
                    carries_from.clone_from(&root);
                }
                for f in carried {
                    eprintln!(
                        "carrying over {} (a grant in force in the newest bundle, which stands on the bundle valid from {}; --drop-grants leaves it out)",
                        f.name,
                        root.as_deref().unwrap_or("-")
                    );
                    files.push(f);
                }
                files.sort_by(|a, b| a.name.cmp(&b.name));
            }
            let n = files.len();
            let signing = sign_push(
                dir,
                &files,
                sign_key,
                expires_in.as_deref(),
                None,
                carries_from,
            )?;
            let r: Result<Pushed, ClientError> = c
                .send_json(
                    hyper::Method::PUT,
                    "/v1/policy",
                    &PushRequest {
                        files,
                        base_version: *base_version,
                        signing,
                    },
                    std::time::Duration::from_secs(60),
                )
                .await;
            match r {
                Ok(Pushed::Bundle(b)) if json => print_json(&serde_json::json!({
                    "version": b.version, "revision": b.revision, "files": n,
                })),
                Ok(Pushed::Bundle(b)) => println!(
                    "pushed version {} revision {} ({n} file(s))",
                    b.version, b.revision
                ),
                Ok(p) => print_pushed(&p, json),
                Err(ClientError::Refused { body, errors, .. }) if !errors.is_empty() => {
                    // Point at the files as the admin has them.
                    for e in &errors {
                        let mut e = e.clone();
                        e.file = dir.join(&e.file).display().to_string();
                        eprintln!("{e}");
                    }
                    bail!("{body}");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Command::Policy(PolicyCommand::Approve {
            id,
            sign_key,
            sha256,
            trusted_signer,
        }) => {
            let p = proposal(&c, *id).await?;
            let (revision, digest) = hashed(&p.files)?;
            if revision != p.revision {
                bail!(
                    "proposal {id} names revision {}, but its files hash to {revision} here: not signed",
                    p.revision
                );
            }
            // What is signed is what was reviewed: the files `proposals --id` showed, by
            // their whole hash, not whatever the control plane answers now.
            if !digest.eq_ignore_ascii_case(sha256.trim()) {
                bail!(
                    "proposal {id}'s files hash to sha256 {digest} now, not the {sha256} given: not signed (review it again with `policy proposals --id {id}`)"
                );
            }
            let Some(nb) = &p.signing.not_before else {
                bail!("proposal {id} names no not_before to sign");
            };
            // The times are signed too, and the control plane gave them.
            p.signing
                .dated_sanely(time::OffsetDateTime::now_utc())
                .with_context(|| format!("proposal {id} is not signed"))?;
            // Approved only on top of a signer's own push, as it stands: the pusher's CLI
            // checked what it added grants to, and its signature covers the times and that
            // base, so a proposal made up or re-dated by whoever holds the control plane
            // gets no approval.
            let keyring = agentwall::control_plane::signing::Keyring::load_files(trusted_signer)?;
            let first: Vec<&str> = p
                .signing
                .signatures
                .iter()
                .filter(|s| keyring.check_one(&digest, &p.signing, s).is_ok())
                .map(|s| keyring.name_of(&s.key).unwrap_or(s.key.as_str()))
                .collect();
            if first.is_empty() {
                bail!(
                    "proposal {id} (pushed by {}) carries no signature by a --trusted-signer key that verifies for its files and times: a proposal is approved only on top of a signer's own signed push; not signed",
                    p.pushed_by
                );
            }
            eprintln!(
                "signing proposal {id}: revision {revision}, pushed by {} at {} and signed by {}, valid from {nb}{}{}, files {}",
                p.pushed_by,
                p.pushed_at,
                first.join(", "),
                p.signing
                    .expires_at
                    .as_deref()
                    .map(|e| format!(" until {e}"))
                    .unwrap_or_default(),
                p.signing
                    .adds_to
                    .as_deref()
                    .map(|b| format!(", adding grants to the bundle valid from {b}"))
                    .unwrap_or_default()
                    + &p.signing
                        .carries_from
                        .as_deref()
                        .map(|b| format!(", carrying grants over from the bundle valid from {b}"))
                        .unwrap_or_default(),
                p.files
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let signature = agentwall::control_plane::signing::sign(sign_key, &digest, &p.signing)?;
            let r: Pushed = c
                .send_json(
                    hyper::Method::POST,
                    "/v1/policy/approve",
                    &Approval { id: *id, signature },
                    std::time::Duration::from_secs(60),
                )
                .await?;
            print_pushed(&r, json);
        }
        Command::Policy(PolicyCommand::Proposals { id }) => {
            let all: Vec<Proposal> = match id {
                Some(id) => vec![proposal(&c, *id).await?],
                None => c.get("/v1/policy/proposals").await?,
            };
            if json {
                print_json(&all);
            } else {
                for p in &all {
                    let state = match p.version {
                        Some(v) => format!("published as version {v}"),
                        None => "awaiting approvals".to_owned(),
                    };
                    let signers: Vec<&str> = p
                        .signing
                        .signatures
                        .iter()
                        .map(|s| s.signer.as_str())
                        .collect();
                    println!(
                        "proposal {} revision {} pushed {} by {}: {state}; signed by {}",
                        p.id,
                        p.revision,
                        p.pushed_at,
                        p.pushed_by,
                        if signers.is_empty() {
                            "no one".to_owned()
                        } else {
                            signers.join(", ")
                        }
                    );
                    if !p.files.is_empty()
                        && let Ok((_, digest)) = hashed(&p.files)
                    {
                        println!("sha256 {digest} (approve it with --sha256 {digest})");
                    }
                    for f in &p.files {
                        println!("--- {} ({} bytes)", f.name, f.text.len());
                        print!("{}", f.text);
                        if !f.text.ends_with('\n') {
                            println!();
                        }
                    }
                }
            }
        }
        Command::Policy(PolicyCommand::Show { version }) => {
            let path = match version {
                Some(v) => format!("/v1/policy?version={v}"),
                None => "/v1/policy".to_owned(),
            };
            let b: Bundle = c.get(&path).await?;
            if json {
                print_json(&b);
            } else {
                println!(
                    "version {} revision {} pushed {} by {}",
                    b.version, b.revision, b.pushed_at, b.pushed_by
                );
                for f in &b.files {
                    println!("--- {} ({} bytes)", f.name, f.text.len());
                    print!("{}", f.text);
                    if !f.text.ends_with('\n') {
                        println!();
                    }
                }
            }
        }
        Command::Policy(PolicyCommand::Versions) => {
            let all: Vec<BundleInfo> = c.get("/v1/policy/versions").await?;
            if json {
                print_json(&all);
            } else {
                for b in &all {
                    println!(
                        "version {} revision {} pushed {} by {}",
                        b.version, b.revision, b.pushed_at, b.pushed_by
                    );
                }
            }
        }
        Command::Policy(PolicyCommand::Diff { from, to }) => {
            let d: PolicyDiff = c
                .get(&format!("/v1/policy/diff?from={from}&to={to}"))
                .await?;
            if json {
                print_json(&d);
            } else if d.files.is_empty() {
                println!("versions {from} and {to} hold the same files");
            } else {
                for f in &d.files {
                    print!("{}", f.diff);
                }
            }
        }
        Command::Policy(PolicyCommand::Simulate {
            dir,
            since,
            allow_new_denials,
        }) => {
            let req = SimulateRequest {
                files: read_bundle(dir)?,
                since: since.as_deref().map(when).transpose()?,
            };
            let r: Result<SimulateReply, ClientError> = c
                .send_json(
                    hyper::Method::POST,
                    "/v1/policy/simulate",
                    &req,
                    std::time::Duration::from_secs(300),
                )
                .await;
            let r = match r {
                Ok(r) => r,
                Err(ClientError::Refused { body, errors, .. }) if !errors.is_empty() => {
                    for e in &errors {
                        let mut e = e.clone();
                        e.file = dir.join(&e.file).display().to_string();
                        eprintln!("{e}");
                    }
                    bail!("{body}; nothing was simulated");
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&r);
            } else {
                super::policy::print_simulation(&r.simulation, &r.revision);
                if r.truncated {
                    println!(
                        "(the control plane holds more than {} records; the first {} were replayed: narrow it with --since)",
                        agentwall::control_plane::REVIEW_RECORDS,
                        r.records
                    );
                }
            }
            if !r.simulation.newly_denied.is_empty() && !allow_new_denials {
                bail!(
                    "{} flow(s) would newly be denied (--allow-new-denials to succeed anyway)",
                    r.simulation.newly_denied.len()
                );
            }
        }
        Command::Report(ReportCommand::Unused { since }) => {
            let path = since_path("/v1/reports/unused", since.as_deref())?;
            let r: UnusedReply = c.get(&path).await?;
            if json {
                print_json(&r);
            } else {
                super::report::print_unused(&r.report, &r.revision);
                if r.truncated {
                    println!(
                        "(the control plane holds more than {} records; the first {} were counted: narrow it with --since)",
                        agentwall::control_plane::REVIEW_RECORDS,
                        r.records
                    );
                }
            }
        }
        Command::Report(ReportCommand::Grants { since }) => {
            let path = since_path("/v1/reports/grants", since.as_deref())?;
            let r: agentwall::control_plane::GrantsReply = c.get(&path).await?;
            if json {
                print_json(&r);
            } else {
                if r.grants.is_empty() {
                    println!("no grants in the {} version(s) read", r.versions);
                }
                for g in &r.grants {
                    let v = &g.grant;
                    say!(
                        "{} {} until {} ({}{}): {}",
                        v.name,
                        v.identity,
                        v.until,
                        if v.active { "in force" } else { "ended" },
                        if v.break_glass { ", break-glass" } else { "" },
                        v.rules.join("; ")
                    );
                    say!(
                        "  {} {} at {} by {}; signed by {}",
                        if g.held_before {
                            "pushed in that version or one older than those reviewed; held by version"
                        } else {
                            "pushed in version"
                        },
                        g.version,
                        g.pushed_at,
                        g.pushed_by,
                        if g.signed_by.is_empty() {
                            "nobody".to_owned()
                        } else {
                            g.signed_by.join(", ")
                        }
                    );
                    say!("  reason: {}", v.reason);
                    say!("  {} flow(s) allowed", g.allowed);
                    for f in &g.flows {
                        say!(
                            "    {} -> {}:{}/{} x{}",
                            f.node,
                            f.dest,
                            f.port,
                            if f.protocol.is_empty() {
                                "any"
                            } else {
                                &f.protocol
                            },
                            f.count
                        );
                    }
                }
                if r.truncated {
                    println!(
                        "(the control plane holds more than {} records; the first {} were counted: narrow it with --since)",
                        agentwall::control_plane::REVIEW_RECORDS,
                        r.records
                    );
                }
            }
        }
        Command::ConsoleLink => {
            let r: serde_json::Value = c
                .call(
                    hyper::Method::POST,
                    "/v1/console/links",
                    None,
                    std::time::Duration::from_secs(30),
                )
                .await?;
            let link = format!(
                "{}{}",
                c.url().trim_end_matches('/'),
                r["path"].as_str().unwrap_or_default()
            );
            if json {
                print_json(&serde_json::json!({ "url": link, "expires": r["expires"] }));
            } else {
                println!("{link}");
                println!(
                    "(signs one browser in, once, until {})",
                    r["expires"].as_str().unwrap_or("?")
                );
            }
        }
        Command::EndSessions { principal } => {
            let path = match principal {
                Some(p) => format!(
                    "/v1/console/sessions?{}",
                    serde_urlencoded::to_string([("principal", p)])?
                ),
                None => "/v1/console/sessions".to_owned(),
            };
            let r: serde_json::Value = c
                .call(
                    hyper::Method::DELETE,
                    &path,
                    None,
                    std::time::Duration::from_secs(30),
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                println!("ended {} console session(s)", r["ended"]);
            }
        }
        Command::Nodes => {
            let nodes: Vec<NodeInfo> = c.get("/v1/nodes").await?;
            if json {
                print_json(&nodes);
            } else {
                for n in &nodes {
                    let applied = match (n.applied_version, &n.applied_revision) {
                        (Some(v), Some(r)) => format!("version {v} revision {r}"),
                        _ => "no bundle applied".to_owned(),
                    };
                    say!(
                        "{}  last seen {}  {applied}  agentwall {}{}",
                        n.node,
                        n.last_seen,
                        n.agent_version.as_deref().unwrap_or("?"),
                        agentwall::policy::owner::describe(n.owner.as_ref(), &n.labels)
                    );
                    if let Some(e) = &n.error {
                        say!("  error: {e}");
                    }
                }
                println!("{} node(s)", nodes.len());
            }
        }
        Command::Flows(f) => {
            let mut q = FlowQuery {
                node: f.node.clone(),
                identity: f.identity.clone(),
                verdict: f.verdict.clone(),
                dest: f.dest.clone(),
                service: f.service.clone(),
                owner: f.owner.clone(),
                since: f.since.as_deref().map(when).transpose()?,
                until: f.until.as_deref().map(when).transpose()?,
                after: f.after,
                limit: f.limit,
                kind: f.kind.clone(),
                format: f.format.clone(),
                tagged: false,
                every_kind: false,
            };
            if q.format.is_some() {
                return ocsf_flows(&c, q, f.all).await;
            }
            let mut all = Vec::new();
            loop {
                let path = format!("/v1/flows?{}", serde_urlencoded::to_string(&q)?);
                let page: FlowPage = c.get(&path).await?;
                let next = page.next;
                if json {
                    all.extend(page.flows);
                } else {
                    for s in &page.flows {
                        match serde_json::from_str::<FlowRecord>(s.record.get()) {
                            Ok(r) => say!("{} {r}", s.node),
                            Err(_) => say!("{} {}", s.node, s.record),
                        }
                    }
                }
                match next {
                    Some(n) if f.all => q.after = Some(n),
                    Some(n) => {
                        if json {
                            print_json(&FlowPage {
                                flows: all,
                                next: Some(n),
                            });
                        } else {
                            println!("more: --after {n}");
                        }
                        return Ok(());
                    }
                    None => break,
                }
            }
            if json {
                print_json(&FlowPage {
                    flows: all,
                    next: None,
                });
            }
        }
        Command::ShadowAi { since } => {
            let path = since_path("/v1/shadow-ai", since.as_deref())?;
            let nodes: Vec<NodeShadowAi> = c.get(&path).await?;
            if json {
                print_json(&nodes);
            } else {
                let mut groups = 0;
                for n in &nodes {
                    say!(
                        "node {}{}",
                        n.node,
                        agentwall::policy::owner::describe(n.owner.as_ref(), &n.labels)
                    );
                    super::shadow_ai::print_groups(&n.groups, "  ");
                    if n.records_left_out > 0 {
                        println!(
                            "  and {} record(s) of further process groups (at most {} are shown a node)",
                            n.records_left_out,
                            agentwall::discovery::SHADOW_GROUPS
                        );
                    }
                    groups += n.groups.len();
                }
                println!(
                    "{groups} process group(s) on {} node(s) reached AI services without an identity",
                    nodes.len()
                );
            }
        }
        Command::Alerts { since } => {
            let path = since_path("/v1/alerts", since.as_deref())?;
            let r: agentwall::control_plane::AlertsReply = c.get(&path).await?;
            if json {
                print_json(&r);
            } else {
                let t = &r.thresholds;
                println!(
                    "thresholds: new destinations after {} h of learning; {} denials in {} s; {} refused DNS queries in {} s, or a label of {}+ characters at {}+ bits each; new shadow-AI groups; at most {} of a kind about an identity a minute and {} from a node; {} webhook(s){}",
                    t.learning_hours,
                    t.denials,
                    t.denial_window_secs,
                    t.dns_refusals,
                    t.dns_window_secs,
                    t.dns_label_length,
                    t.dns_entropy_bits,
                    t.per_minute,
                    t.node_per_minute,
                    t.webhooks.len(),
                    if t.enabled { "" } else { " (alerts are off)" }
                );
                for a in &r.alerts {
                    let s = |k: &str| a.get(k).and_then(|v| v.as_str()).unwrap_or("-");
                    say!(
                        "{} {} {} {} on {}: {}",
                        s("time"),
                        s("alert"),
                        s("severity"),
                        a.get("identity")
                            .or(a.get("subject"))
                            .and_then(|v| v.as_str())
                            .unwrap_or("-"),
                        s("node"),
                        s("summary")
                    );
                    say!(
                        "  evidence: {}",
                        a.get("evidence").map(|e| e.to_string()).unwrap_or_default()
                    );
                }
                println!("{} alert(s)", r.alerts.len());
            }
        }
        Command::Audit(AuditCommand::Verify { node }) => {
            let q = serde_urlencoded::to_string([("node", node)]).expect("a query string");
            let r: ChainReport = c.get(&format!("/v1/audit/chain?{q}")).await?;
            if json {
                print_json(&r);
            } else {
                print_chain(&r);
            }
            if r.records == 0 {
                bail!("the control plane holds no audit records of {node}: nothing to verify");
            }
            if !r.intact {
                bail!(
                    "the audit chain of {node} is not intact: {} record(s) do not check out, {} seq(s) missing that the node did not report lost, {} record(s) outside the chain for {} its log could not write",
                    r.breaks_total,
                    r.unexplained,
                    r.unchained,
                    r.audit_write_failures
                );
            }
        }
        Command::Grant {
            identity,
            to,
            ports,
            protocol,
            lasting,
            reason,
            sign_key,
            break_glass,
            base,
        } => {
            let b: Bundle = c
                .get("/v1/policy")
                .await
                .context("a grant adds to the newest bundle")?;
            if !sign_key.is_empty() {
                verified_base(&c, &b, base).await?;
                eprintln!(
                    "adding the grant to version {} (revision {}, valid from {}{}, signed by {})",
                    b.version,
                    b.revision,
                    b.signing.not_before.as_deref().unwrap_or("-"),
                    b.signing
                        .adds_to
                        .as_deref()
                        .map(|t| format!(", itself grants on the bundle valid from {t}"))
                        .unwrap_or_default(),
                    b.signing
                        .signatures
                        .iter()
                        .map(|s| s.signer.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let req = agentwall::policy::grant::GrantRequest {
                identity,
                to,
                ports,
                protocol: protocol.as_deref(),
                lasting: agentwall::review::parse_duration(lasting)?,
                reason,
                break_glass: *break_glass,
            };
            let (name, text) =
                agentwall::policy::grant::grant_file(&req, std::time::SystemTime::now())?;
            let mut files = b.files.clone();
            files.push(BundleFile {
                name: name.clone(),
                text,
            });
            files.sort_by(|a, b| a.name.cmp(&b.name));
            // Checked here first: what is wrong is said against the grant asked for.
            hashed(&files).with_context(|| format!("granting {name}"))?;
            // Signed as added to the full bundle under the one checked above: a node that
            // applied a newer one refuses it, so an old bundle passed off as the newest does
            // not come back, with grants on it or on grants on it.
            let signing = sign_push(
                Path::new(&name),
                &files,
                sign_key,
                None,
                b.signing.root().map(str::to_owned),
                None,
            )?;
            let r: Pushed = c
                .send_json(
                    hyper::Method::PUT,
                    "/v1/policy",
                    &PushRequest {
                        files,
                        base_version: Some(b.version),
                        signing,
                    },
                    std::time::Duration::from_secs(60),
                )
                .await?;
            if !json {
                println!(
                    "{}: {identity} may reach {} until the deadline in it",
                    name.trim_end_matches(".yaml"),
                    to.join(", ")
                );
            }
            print_pushed(&r, json);
        }
        Command::Grants => {
            let b: Bundle = c.get("/v1/policy").await?;
            let set = agentwall::control_plane::validate(&b.files).map_err(|errors| {
                let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
                anyhow::anyhow!("version {} is invalid here:\n{}", b.version, all.join("\n"))
            })?;
            let all = agentwall::policy::grant::views(&set, time::OffsetDateTime::now_utc());
            if json {
                print_json(&all);
            } else {
                if all.is_empty() {
                    println!("no grants in version {}", b.version);
                }
                for g in &all {
                    say!(
                        "{} {} until {} ({}{}): {}; reason: {}",
                        g.name,
                        g.identity,
                        g.until,
                        if g.active { "in force" } else { "ended" },
                        if g.break_glass { ", break-glass" } else { "" },
                        g.rules.join("; "),
                        g.reason
                    );
                }
            }
        }
        Command::Identity(cmd) => identity_command(&c, cmd, json).await?,
        Command::Revoke { identity, reason } => {
            let r: serde_json::Value = c
                .send_json(
                    hyper::Method::POST,
                    "/v1/revocations",
                    &RevokeRequest {
                        identity: identity.clone(),
                        reason: reason.clone(),
                    },
                    std::time::Duration::from_secs(30),
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "revoked {} on every node (revocation generation {})",
                    r["identity"].as_str().unwrap_or(identity),
                    r["generation"]
                );
            }
        }
    }
    Ok(())
}
