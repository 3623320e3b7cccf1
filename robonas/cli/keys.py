"""`robonas keys generate`: the Ed25519 key pair that signs artifacts."""

from __future__ import annotations

import typer

from robonas.cli.common import console

keys_app = typer.Typer(
    help="Ed25519 keys that sign artifacts (robots trust the public key).", no_args_is_help=True
)


@keys_app.command("generate")
def keys_generate(
    out: str = typer.Option(..., "--out", help="Directory for the key pair."),
    name: str = typer.Option("robonas", "--name", help="File name stem of the pair."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing pair."),
) -> None:
    """Make an Ed25519 key pair: NAME.key (private, mode 0600) and NAME.pub (give it to robots)."""
    from device_agents.signing import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(out, name=name, overwrite=overwrite)
    console().print(f"private key {private}\npublic key  {public} (key id {key_id(load_public_key(public))})")
