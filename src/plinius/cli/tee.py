"""``plinius tee status`` and ``plinius keyserver``."""

from __future__ import annotations

from pathlib import Path

import click

from ._paths import check_distinct_paths, owned_by_counter_dir

_ROOT_HELP = "(for testing or unusual mounts; default ${env} or {default})"


def register(group: click.Group) -> None:
    """Add the TEE commands to ``group``."""
    group.add_command(tee)
    group.add_command(keyserver)


@click.group()
def tee() -> None:
    """Trusted execution: which TEE this is and what it can do."""


@tee.command()
@click.option(
    "--attestation-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Gramine's attestation directory "
    + _ROOT_HELP.format(env="PLINIUS_ATTESTATION_ROOT", default="/dev/attestation"),
)
@click.option(
    "--tsm-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The configfs-tsm report directory "
    + _ROOT_HELP.format(env="PLINIUS_TSM_ROOT", default="/sys/kernel/config/tsm/report"),
)
def status(attestation_root: Path | None, tsm_root: Path | None) -> None:
    """Show the detected platform, its evidence and how the key is kept."""
    from ..tee import detect_platform, simulation_measurement

    p = detect_platform(attestation_root, tsm_root)
    evidence = {
        "gramine-sgx": "SGX DCAP quote through /dev/attestation",
        "tdx": "TDX quote through configfs-tsm",
        "sev-snp": "SEV-SNP attestation report through configfs-tsm",
    }.get(
        p.kind, "SIMULATED (forgeable; a key server accepts it only with allow_simulation = true)"
    )
    if p.kind == "gramine-sgx" and p.attestation_type != "dcap":
        evidence = "none: remote attestation is not set to dcap in the Gramine manifest"
    click.echo(f"platform: {p.kind}")
    click.echo(f"description: {p.description}")
    click.echo(f"evidence: {evidence}")
    click.echo(f"sealing: {p.sealing}")
    if p.can_seal:
        click.echo("key server: asked once; later starts unseal the key locally")
    else:
        click.echo("key server: asked again on every start (no sealing key on this platform)")
    if p.simulated:
        click.echo(f"simulation measurement: {simulation_measurement().hex()}")
    if not p.secure:
        click.secho(
            "WARNING: INSECURE: no hardware protects the key or the training state here; "
            "use it for development only",
            fg="red",
            bold=True,
        )


@click.command()
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The master key file to release.",
)
@click.option(
    "--policy",
    "policy_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The release policy (TOML; see docs/TEE.md).",
)
@click.option(
    "--identity",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The server's Ed25519 identity key (created, mode 0600, when missing).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8470,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port, printed on start).",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append one JSON line per release or refusal here (default: stderr).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate (chain): serve HTTPS (needs --tls-key).",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--nonce-ttl",
    type=click.FloatRange(min=0.001, max=3600),
    default=60.0,
    show_default=True,
    help="Seconds a nonce stays valid.",
)
@click.option(
    "--verifier",
    default="none",
    show_default=True,
    help="Quote verifier for hardware evidence: none, dcap-qvl, or module:factory.",
)
@click.option("--pccs-url", default=None, help="PCCS for the dcap-qvl verifier's collateral.")
@click.option(
    "--counter-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep per-job freshness counters here (created, mode 0700; back it up: "
    "losing it resets every job's rollback protection). Without it the counter "
    "service is off.",
)
def keyserver(
    key_path: Path,
    policy_path: Path,
    identity: Path,
    host: str,
    port: int,
    audit_log: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    nonce_ttl: float,
    verifier: str,
    pccs_url: str | None,
    counter_dir: Path | None,
) -> None:
    """Release the master key to attested plinius jobs (run by the data owner).

    Prints 'listening on URL' and 'public key: HEX' once it accepts
    connections; give both to 'plinius train --key-server URL
    --key-server-pubkey HEX'. With --counter-dir it also keeps each job's
    freshness counter ('plinius train --counter keyserver'). Stop it with Ctrl-C.
    """
    import ipaddress

    from ..crypto import MasterKey
    from ..tee.audit import AuditLog
    from ..tee.counter_service import CounterStore
    from ..tee.keyserver import KeyServer, serve
    from ..tee.policy import Policy
    from ..tee.protocol import load_identity
    from ..tee.verify import load_verifier

    if pccs_url is not None and verifier != "dcap-qvl":
        raise click.UsageError("--pccs-url applies to --verifier dcap-qvl only")
    # The audit log is appended to, the identity created, the counter directory
    # rewritten: none may be another option's file (see plinius.cli._paths).
    check_distinct_paths(
        {
            "--key": key_path,
            "--policy": policy_path,
            "--identity": identity,
            "--audit-log": audit_log,
            "--tls-cert": tls_cert,
            "--tls-key": tls_key,
        },
        {"--counter-dir": (counter_dir, owned_by_counter_dir)},
        allowed=frozenset({frozenset({"--tls-cert", "--tls-key"})}),
    )
    master = MasterKey.load(key_path)
    policy = Policy.load(policy_path)
    ident = load_identity(identity)
    quote_verifier = load_verifier(verifier, pccs_url=pccs_url)
    counters = CounterStore(counter_dir) if counter_dir is not None else None
    server = KeyServer(
        master,
        policy,
        ident,
        verifier=quote_verifier,
        nonce_ttl=nonce_ttl,
        audit_log=AuditLog(audit_log),
        counters=counters,
    )
    if policy.allow_simulation:
        click.echo(
            "WARNING: the policy allows SIMULATED evidence: any program that can reach this "
            "server can obtain the key; for development only",
            err=True,
        )
    if quote_verifier is None:
        click.echo(
            "note: no quote verifier configured; hardware evidence will be refused", err=True
        )
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and tls_cert is None:
        click.echo(
            f"WARNING: listening on {host} without TLS; responses are signed and the key is "
            "encrypted to the job, but use --tls-cert/--tls-key beyond loopback",
            err=True,
        )

    def ready(url: str) -> None:
        click.echo(f"listening on {url}")
        click.echo(f"public key: {server.public_key_hex}")

    try:
        serve(server, host, port, tls_cert=tls_cert, tls_key=tls_key, on_ready=ready)
    finally:
        server.audit.close()
        if counters is not None:
            counters.close()
