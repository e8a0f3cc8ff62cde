//! Command-line interface: every argument structure, with its help text.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::loader::AttachMode;

/// Egress steering dataplane: makes every flow leave the gateway from the
/// egress address its policy chooses, with replies translated back.
#[derive(Parser, Debug)]
#[command(name = "egress-agent", version)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the dataplane to an uplink and steer traffic until SIGINT or
    /// SIGTERM; SIGHUP reloads the policy file (a bad file is rejected and
    /// the running policies stay in force).
    ///
    /// Example: egress-agent run --config /etc/egress/policies.json --uplink eth0
    Run(RunArgs),
    /// Remove a dataplane a stopped agent left pinned (`run
    /// --keep-dataplane`, a crash): detach its programs and remove its pinned
    /// maps, which ends every flow it was translating. Refused while an agent
    /// runs on the pin path; nothing to remove is not an error.
    ///
    /// Example: egress-agent down --pin-path /sys/fs/bpf/egress-agent
    Down(DownArgs),
    /// Validate a policy file and print what it compiles to. Nothing is
    /// loaded or attached.
    ///
    /// Example: egress-agent check /etc/egress/policies.json
    Check(CheckArgs),
    /// Show which policy a flow would match, why each earlier one does not,
    /// and the egress address it would leave from.
    ///
    /// Example: egress-agent explain --config policies.json --src 10.10.0.2 --dst 192.0.2.10 --proto tcp --dst-port 443 --group finance
    Explain(ExplainArgs),
    /// Convert policies exported from another product into a policy file.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Add, replace, list or remove sessions (who is behind which source
    /// addresses) of the running agent, through its control API.
    ///
    /// Example: egress-agent session add ana-laptop --user ana@example.com --group finance --address 10.10.0.2 --ttl 8h
    Session(SessionArgs),
    /// Change the posture tags of a running session; new flows from its
    /// addresses are classified with the new tags.
    ///
    /// Example: egress-agent posture set ana-laptop compliant disk-encrypted
    Posture(PostureArgs),
    /// List the running agent's policies, in order, with their counters.
    /// When the agent is not answering (stopped with --keep-dataplane), the
    /// counters of the named policy slots are read from the pinned maps.
    ///
    /// Example: egress-agent policies --json
    Policies(PoliciesArgs),
    /// Reload the running agent's policy file, identities file and country
    /// databases, as SIGHUP does. A bad file is refused with the field at
    /// fault and the running configuration stays in force.
    ///
    /// Example: egress-agent reload
    Reload(ReloadArgs),
    /// Switch the running agent's kernel log records on or off: the
    /// dataplane's own warnings about rare events (new flows dropped for
    /// want of a port, an address or table space; packets it cannot
    /// translate; failed rewrites), shown in the agent's log. Off by
    /// default and at every start: while on, a flood of such drops logs a
    /// line per dropped packet.
    ///
    /// Example: egress-agent log kernel on
    Log(LogArgs),
    /// Show the running agent's counters (`stats geo`: the country
    /// databases: files, load time, prefixes, kernel memory). When the
    /// agent is not answering, the counters are read from the pinned maps.
    ///
    /// Example: egress-agent stats geo --json
    Stats(StatsArgs),
    /// List the flows in the connection tables: original and translated
    /// tuples, policy, user, age, packets and bytes each way. Reads the
    /// pinned maps, so it works while the agent runs and after it stopped
    /// with --keep-dataplane (users come from the running agent's sessions).
    ///
    /// Example: egress-agent flows --user ana@example.com --egress 203.0.113.10
    Flows(FlowsArgs),
    /// List the pinned maps: type, entries and capacity (arrays always hold
    /// their capacity).
    ///
    /// Example: egress-agent maps --json
    Maps(MapsArgs),
}

#[derive(Subcommand, Debug)]
pub enum ImportCommand {
    /// Zero-trust gateway egress rules (a JSON list, or an API response with
    /// a "result" list) with `traffic`, `identity`, `device_posture`
    /// expressions and `rule_settings.egress` addresses. Rules are ordered by
    /// precedence; each distinct address triple becomes a pool; an egress of
    /// 0.0.0.0 means the shared default. The result is checked like any
    /// policy file before it is written.
    ///
    /// Example: egress-agent import gateway-rules rules.json --default-ipv4 203.0.113.1 -o policies.json
    GatewayRules(ImportArgs),
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The exported rules (JSON).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The shared default egress address (the rules only say "0.0.0.0").
    #[arg(long, value_name = "IPV4")]
    pub default_ipv4: std::net::Ipv4Addr,
    /// The shared default IPv6 egress address.
    #[arg(long, value_name = "IPV6")]
    pub default_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the policy file (standard output by default).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Policy file (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Interface flows leave from; the TC programs attach here. Repeatable:
    /// a pool whose `interface` names one of them has its flows leave from
    /// it (redirected there when routing chose another uplink); replies are
    /// restored on whichever uplink they arrive.
    ///
    /// Example: --uplink eth0 --uplink eth1
    #[arg(long, value_name = "IFACE", required = true)]
    pub uplink: Vec<String>,

    /// Flows the connection tables hold (each direction); overrides the
    /// policy file's nat.max_flows.
    #[arg(long, value_name = "N")]
    pub max_flows: Option<u32>,

    /// Classifier classes per policy generation (each takes 520 bytes).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_CLASSES_PER_GEN)]
    pub max_classes: u32,

    /// Prefixes each classifier trie holds (both generations together).
    #[arg(long, value_name = "N", default_value_t = egress_common::maps::DEFAULT_PREFIXES)]
    pub max_prefixes: u32,

    /// How to attach the TC programs.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// Directory on a BPF filesystem (created 0700) where the maps and the
    /// program attachments are pinned. An agent started on a pin path that
    /// holds a dataplane (left by --keep-dataplane, a crash or `kill -9`)
    /// takes it over: established flows keep their translation and keep
    /// flowing, counters continue. Only one agent may use a pin path.
    /// `ip netns exec` hides /sys/fs/bpf: there, use a BPF filesystem
    /// mounted elsewhere.
    #[arg(long, value_name = "DIR", default_value = crate::pin::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,

    /// On SIGINT/SIGTERM leave the dataplane running for the next agent:
    /// programs stay attached and maps pinned (for an upgrade or a planned
    /// restart). Without it the agent detaches and removes its pins.
    /// `egress-agent down` removes a kept dataplane.
    #[arg(long)]
    pub keep_dataplane: bool,

    /// On reload, also re-evaluate established flows and end those the new
    /// policies would send out of another address (by default established
    /// flows keep their translation unless their address was removed).
    #[arg(long)]
    pub reclassify_on_reload: bool,

    /// Where the agent keeps sessions added through the control API, so a
    /// restarted or upgraded agent still has them (created 0700).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/egress-agent")]
    pub state_dir: PathBuf,

    /// Do not reload when the policy file, the identities file or a country
    /// database changes on disk (by default a change that has settled for
    /// half a second triggers a reload, as SIGHUP does).
    #[arg(long)]
    pub no_watch: bool,

    /// Control API socket (HTTP/JSON, root only, created with mode 0600 in
    /// a 0700 directory). `egress-agent session|posture|policies|reload|stats`
    /// talk to it. Startup fails if another agent listens there.
    #[arg(long, value_name = "PATH", default_value = crate::api::DEFAULT_SOCKET)]
    pub api: PathBuf,

    /// Serve Prometheus metrics at http://ADDR/metrics (off by default):
    /// per-policy and per-egress-address traffic, flows and active flows,
    /// port exhaustion, drops by reason, reloads, map fill. Not
    /// authenticated: bind it to a loopback or management address.
    ///
    /// Example: --metrics 127.0.0.1:9464
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Write a flow log: a JSON line for every new translation, every end
    /// of one (reason "fin", "rst", "expired" or "flushed") and every new
    /// flow dropped for want of a port ("port_exhausted"), with the time,
    /// original and translated tuples, policy and user. FILE is appended to
    /// (created 0600); `-` is standard output. A destination that cannot be
    /// written is retried every few seconds; lines meanwhile are lost and
    /// counted. Without it the dataplane emits no flow events at all.
    ///
    /// Format: {"time":"2026-05-01T10:00:00.25Z","event":"new","reason":"translated","protocol":"tcp","original":{"src":"10.10.0.2","sport":40001,"dst":"192.0.2.10","dport":443},"translated":{"src":"203.0.113.10","sport":40001,"dst":"192.0.2.10","dport":443},"policy":"partner","identity":3,"user":"ana@example.com"}
    #[arg(long, value_name = "FILE|-")]
    pub flow_log: Option<PathBuf>,

    /// Identities file (JSON): sessions known ahead of time, each with
    /// `user`, `groups`, `posture`, `addresses` and optional `id` and
    /// `expires_at`. Reloaded with the policies (SIGHUP, `egress-agent reload`).
    ///
    /// Format: {"sessions": [{"id": "ana-laptop", "user": "ana@example.com", "groups": ["finance"], "addresses": ["10.10.0.2"]}]}
    #[arg(long, value_name = "FILE")]
    pub identities: Option<PathBuf>,

    /// Sessions the agent holds at most (identities file and API together);
    /// sizes the identity maps. The default fills the identity table.
    #[arg(long, value_name = "N", default_value_t = egress_common::classify::DEFAULT_IDENTITY_SLOTS - 1)]
    pub max_sessions: u32,

    /// Largest control API request body, in bytes (a batch of 100 000
    /// sessions is about 15 MB); larger requests get HTTP 413.
    #[arg(long, value_name = "BYTES", default_value_t = crate::api::DEFAULT_MAX_BODY)]
    pub api_max_body: usize,

    /// Destination-country database (repeatable): a MaxMind DB (`.mmdb`,
    /// with `country_code` or GeoIP2 `country.iso_code` records) or CSV
    /// ranges `first_ip,last_ip,CC` (IPv4 and IPv6, optional header line).
    /// Where files overlap, the one given later wins. Reloaded with the
    /// policies. The country tables take about 78 MiB of kernel memory
    /// with the default sizes below; without --geoip they are not reserved
    /// and every destination's country is unknown.
    ///
    /// Example: --geoip geo-whois-asn-country.mmdb --geoip overrides.csv
    #[arg(long, value_name = "FILE")]
    pub geoip: Vec<PathBuf>,

    /// /24 blocks holding several countries that the country tables hold
    /// per generation (256 bytes each; a full public database has ~16 000).
    #[arg(long, value_name = "N", default_value_t = egress_common::geo::DEFAULT_SPLIT_BLOCKS)]
    pub geo_split_blocks: u32,

    /// IPv6 range entries the country tables hold per generation (24 bytes
    /// each; a full public database needs ~280 000).
    #[arg(long, value_name = "N", default_value_t = egress_common::geo::DEFAULT_V6_RANGES)]
    pub geo_v6_ranges: u32,

    /// Accept a policy file, identities file or country database that a
    /// user other than root (or the agent's own user) could change: by
    /// default such a file is refused at start and on reload, because
    /// whoever can write it decides which address traffic leaves from.
    #[arg(long)]
    pub allow_insecure_config: bool,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    /// The pin path the agent ran with (its `run --pin-path`).
    #[arg(long, value_name = "DIR", default_value = crate::pin::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Policy file (JSON).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Policy file (JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Source address of the flow.
    #[arg(long)]
    pub src: std::net::IpAddr,
    /// Destination address of the flow.
    #[arg(long)]
    pub dst: std::net::IpAddr,
    /// Protocol: tcp, udp, icmp, icmpv6, or an IP protocol number.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// Destination port (TCP and UDP).
    #[arg(long, default_value_t = 0)]
    pub dst_port: u16,
    /// The user behind the source (e-mail); with --group/--posture, the
    /// flow has an identity.
    #[arg(long)]
    pub user: Option<String>,
    /// A group of the user (repeatable).
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// A posture check the device passes (repeatable).
    #[arg(long = "posture")]
    pub posture: Vec<String>,
    /// Destination country (ISO 3166-1 alpha-2). Without it, the country
    /// comes from the --geoip databases, if any.
    #[arg(long)]
    pub country: Option<String>,
    /// Country database to look the destination up in when --country is
    /// not given (repeatable, as `run --geoip`: a later file wins where
    /// files overlap).
    ///
    /// Example: --geoip geo-whois-asn-country-ipv4.csv --geoip geo-whois-asn-country-ipv6.csv
    #[arg(long, value_name = "FILE")]
    pub geoip: Vec<PathBuf>,
}

/// Where the running agent's control API listens.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// Control API socket of the running agent (its `run --api`).
    #[arg(long, value_name = "PATH", default_value = crate::api::DEFAULT_SOCKET, global = true)]
    pub api: PathBuf,
}

#[derive(Args, Debug)]
pub struct SessionArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: SessionCommand,
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Add a session, or replace the one with the same id. Its addresses
    /// must not overlap another live session's.
    ///
    /// Example: egress-agent session add ana-laptop --user ana@example.com --group finance --posture compliant --address 10.10.0.2 --address 2001:db8:10::2 --ttl 8h
    Add(SessionAddArgs),
    /// Remove a session: new flows from its addresses have no identity.
    ///
    /// Example: egress-agent session rm ana-laptop
    Rm(SessionRmArgs),
    /// List the sessions (from the identities file and the API).
    ///
    /// Example: egress-agent session ls --json
    Ls(SessionLsArgs),
    /// Add or replace many sessions at once, all or none, from a file in
    /// the identities file's format; entries already expired are skipped.
    ///
    /// Format: {"sessions": [{"id": "ana-laptop", "user": "ana@example.com", "addresses": ["10.10.0.2"]}]} or a bare list of entries
    /// Example: egress-agent session load vpn-sessions.json
    Load(SessionLoadArgs),
}

#[derive(Args, Debug)]
pub struct SessionAddArgs {
    /// Session id: letters, digits and . _ : @ - (at most 256).
    #[arg(value_name = "ID")]
    pub id: String,
    /// The user (e-mail address; compared in lower case).
    #[arg(long, value_name = "USER")]
    pub user: String,
    /// A group of the user (repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// A posture check the device passes (repeatable).
    #[arg(long = "posture", value_name = "TAG")]
    pub posture: Vec<String>,
    /// A source address or prefix of the user's device (repeatable, or
    /// comma-separated).
    ///
    /// Format: 10.10.0.2, 2001:db8:10::2, 10.8.0.0/24 (no host bits)
    #[arg(
        long = "address",
        value_name = "ADDR",
        required = true,
        value_delimiter = ','
    )]
    pub addresses: Vec<crate::identity::Claim>,
    /// When the agent removes the session (RFC 3339).
    ///
    /// Example: --expires-at 2026-12-01T18:00:00Z
    #[arg(long, value_name = "TIME", conflicts_with = "ttl")]
    pub expires_at: Option<jiff::Timestamp>,
    /// Remove the session this long from now.
    ///
    /// Example: --ttl 8h, --ttl "1h 30m"
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<humantime::Duration>,
}

#[derive(Args, Debug)]
pub struct SessionRmArgs {
    /// Session id.
    #[arg(value_name = "ID")]
    pub id: String,
}

#[derive(Args, Debug)]
pub struct SessionLsArgs {
    /// Print the JSON the agent answers instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SessionLoadArgs {
    /// Sessions file (JSON, the identities file's format; entries without
    /// an `id` get `load:<index>`).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the agent's report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PostureArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: PostureCommand,
}

#[derive(Subcommand, Debug)]
pub enum PostureCommand {
    /// Replace a session's posture tags; no tags clears them.
    ///
    /// Example: egress-agent posture set ana-laptop compliant disk-encrypted
    Set(PostureSetArgs),
}

#[derive(Args, Debug)]
pub struct PostureSetArgs {
    /// Session id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The posture checks the device now passes.
    #[arg(value_name = "TAG")]
    pub tags: Vec<String>,
}

/// Where the agent pins its maps, for commands that read them directly.
#[derive(Args, Clone, Debug)]
pub struct PinArgs {
    /// The agent's pin path (its `run --pin-path`).
    #[arg(long, value_name = "DIR", default_value = crate::pin::DEFAULT_PIN_PATH)]
    pub pin_path: PathBuf,
}

#[derive(Args, Debug)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub pin: PinArgs,
    /// The running agent's control API, asked which user is behind each
    /// flow's source address.
    #[command(flatten)]
    pub api: ApiArgs,
    /// Only flows of this user (needs the running agent's sessions).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Only flows translated to this egress address.
    #[arg(long, value_name = "IP")]
    pub egress: Option<std::net::IpAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct MapsArgs {
    #[command(flatten)]
    pub pin: PinArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PoliciesArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Print the JSON the agent answers instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: LogCommand,
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// Kernel log records of rare dataplane events.
    ///
    /// Example: egress-agent log kernel off
    Kernel {
        #[arg(value_enum)]
        state: OnOff,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(flatten)]
    pub pin: PinArgs,
    /// Print the JSON the agent answers.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Option<StatsCommand>,
}

#[derive(Subcommand, Debug)]
pub enum StatsCommand {
    /// The loaded country databases: files, load time, ranges, prefixes
    /// and the kernel memory their tables use.
    ///
    /// Example: egress-agent stats geo
    Geo,
}
