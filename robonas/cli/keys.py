"""`robonas keys`: the keys that sign artifacts and the credentials that authenticate operators.

`generate` makes the Ed25519 pair that signs artifacts (robots trust its public key). `ca`,
`operator` and `agent` make a fleet CA and the certificates issued by it (robonas.credentials);
`trust` writes an agent's operators file, which says which operator keys may do what.
"""

from __future__ import annotations

import typer

from robonas.cli.common import console

keys_app = typer.Typer(
    help="Keys and credentials: artifact signing keys, a fleet CA, operator and agent "
    "certificates, and an agent's trusted operators.",
    no_args_is_help=True,
)

_DAYS_HELP = "Validity in days."


def _private_dir(out: str) -> None:
    """Create the output folder mode 0700 (whatever the umask) before any key goes in it."""
    from pathlib import Path

    from robonas.credentials import make_private_dir

    make_private_dir(Path(out))


@keys_app.command("generate")
def keys_generate(
    out: str = typer.Option(..., "--out", help="Directory for the key pair."),
    name: str = typer.Option("robonas", "--name", help="File name stem of the pair."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pair."),
) -> None:
    """Make an Ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub (give it to robots)."""
    from device_agents.signing import generate_keypair, key_id, load_public_key

    _private_dir(out)
    private, public = generate_keypair(out, name=name, overwrite=overwrite)
    console().print(f"private key {private}\npublic key  {public} (key id {key_id(load_public_key(public))})")


@keys_app.command("ca")
def keys_ca(
    out: str = typer.Option(..., "--out", help="Folder for NAME.crt and NAME.key (created mode 0700)."),
    name: str = typer.Option("fleet-ca", "--name", help="File name stem and common name of the CA."),
    days: int = typer.Option(3650, "--days", help=_DAYS_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing CA (re-issue everything!)."
    ),
) -> None:
    """Make the fleet CA that signs operator and agent certificates.

    Copy NAME.crt to every host and agent; keep NAME.key where certificates are issued.
    """
    from robonas.credentials import make_ca

    cert, key = make_ca(out, name=name, days=days, overwrite=overwrite)
    console().print(
        f"CA certificate {cert} (give it to every host and agent)\n"
        f"CA key         {key} (mode 0600; keep it off the robots)\n"
        f"next: robonas keys operator NAME --ca {cert.parent}"
    )


@keys_app.command("operator")
def keys_operator(
    name: str = typer.Argument(..., help="Operator name: the certificate's CN and file name stem."),
    ca: str = typer.Option(..., "--ca", help="Folder holding the CA's fleet-ca.crt and fleet-ca.key."),
    out: str | None = typer.Option(
        None, "--out", help="Folder for NAME.crt and NAME.key (default: the --ca folder)."
    ),
    ca_name: str = typer.Option("fleet-ca", "--ca-name", help="File name stem of the CA."),
    days: int = typer.Option(825, "--days", help=_DAYS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing NAME pair."),
) -> None:
    """Make an operator identity: an Ed25519 key and a client certificate signed by the CA.

    The host presents it over TLS and signs serial challenges with the same key. Robots trust it
    through their operators file: `robonas keys trust OPERATORS_JSON --name NAME --key NAME.crt`.
    """
    from device_agents.operators import load_operator_key
    from device_agents.signing import key_id
    from robonas.credentials import make_operator

    cert, key = make_operator(out or ca, name, ca, ca_name=ca_name, days=days, overwrite=overwrite)
    kid = key_id(load_operator_key(cert))
    console().print(
        f"operator certificate {cert} (key id {kid})\n"
        f"operator key         {key} (mode 0600)\n"
        f"next, for each agent: robonas keys trust OPERATORS_JSON --name {name} --key {cert} "
        "--roles deploy,run,rollback,bench"
    )


@keys_app.command("agent")
def keys_agent(
    name: str = typer.Argument(..., help="Agent name (as in the fleet inventory): CN and DNS name."),
    ca: str = typer.Option(..., "--ca", help="Folder holding the CA's fleet-ca.crt and fleet-ca.key."),
    out: str | None = typer.Option(
        None, "--out", help="Folder for NAME.crt and NAME.key (default: the --ca folder)."
    ),
    host: list[str] | None = typer.Option(
        None,
        "--host",
        help="An address or DNS name hosts use to reach the agent; repeat for several "
        "(default: 127.0.0.1 and localhost).",
    ),
    ca_name: str = typer.Option("fleet-ca", "--ca-name", help="File name stem of the CA."),
    days: int = typer.Option(825, "--days", help=_DAYS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing NAME pair."),
) -> None:
    """Make an agent's server certificate (serverAuth), valid for NAME and every --host.

    Copy NAME.crt, NAME.key and the CA certificate to the robot.
    """
    from robonas.credentials import DEFAULT_AGENT_HOSTS, make_agent

    hosts = tuple(host) if host else DEFAULT_AGENT_HOSTS
    cert, key = make_agent(out or ca, name, ca, hosts=hosts, ca_name=ca_name, days=days, overwrite=overwrite)
    console().print(
        f"agent certificate {cert} (valid for {', '.join((name, *hosts))})\n"
        f"agent key         {key} (mode 0600)"
    )


@keys_app.command("trust")
def keys_trust(
    operators_json: str = typer.Argument(..., help="The agent's operators file (created if absent)."),
    name: str = typer.Option(..., "--name", help="Operator name, as the agent will log it."),
    key: str = typer.Option(
        ..., "--key", help="The operator's certificate (NAME.crt), public key, or base64 raw key."
    ),
    roles: str = typer.Option(
        "",
        "--roles",
        help="Comma-separated roles from status, run, deploy, rollback, bench "
        "(default: none, i.e. status only).",
    ),
    replace: bool = typer.Option(False, "--replace", help="Replace an operator of the same name."),
    by_path: bool = typer.Option(
        False,
        "--by-path",
        help="Store the key file's path (relative to the file) instead of the key itself.",
    ),
) -> None:
    """Trust an operator's key on an agent: write it, with its roles, into the operators file.

    Every operator may read status; other roles must be granted.
    """
    from device_agents.operators import Operators
    from robonas.credentials import add_operator

    path = add_operator(operators_json, name, key, roles, replace=replace, inline=not by_path)
    op = next(o for o in Operators.from_file(path) if o.name == name)
    console().print(f"{path}: operator {op.name} (key id {op.key_id}) may {', '.join(sorted(op.roles))}")
