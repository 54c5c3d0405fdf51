"""The ``cargohold`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from cargohold import __version__
from cargohold.config import CONFIG_ENV, load_settings


@click.group()
@click.version_option(__version__, prog_name="cargohold")
@click.option(
    "--config",
    "-c",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help="Config file (YAML or TOML).",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """cargohold: a storage-efficient, self-hosted OCI registry."""
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.absolute())


@main.command()
@click.option("--address", help="HOST:PORT to listen on (default 127.0.0.1:5000).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Where data lives.")
@click.option("--workers", type=int, help="Worker processes.")
@click.option("--server", type=click.Choice(["granian", "uvicorn"]), help="ASGI server.")
def serve(address: str | None, data_dir: Path | None, workers: int | None, server: str | None) -> None:
    """Run the registry."""
    # Worker processes rebuild the settings from the environment, so options go there.
    for key, value in (
        ("ADDRESS", address),
        ("DATA_DIR", data_dir and data_dir.absolute()),
        ("WORKERS", workers),
        ("SERVER", server),
    ):
        if value is not None:
            os.environ[f"CARGOHOLD_{key}"] = str(value)
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CARGOHOLD_DATA_DIR"] = str(settings.data_dir.absolute())
    from cargohold.runtime import describe_backend, open_registry

    click.echo(
        f"cargohold {__version__} on http://{settings.address} "
        f"(storage: {describe_backend(settings)}, metadata: {settings.metadata_path.absolute()}, "
        f"{settings.workers} worker(s), {settings.server})",
        err=True,
    )
    # Create the schema once before the workers start (they would race harmlessly anyway).
    open_registry(settings).store.close()
    if settings.server == "granian":
        _serve_granian(settings)
    else:
        _serve_uvicorn(settings)


def _serve_granian(settings) -> None:  # type: ignore[no-untyped-def]
    from granian import Granian
    from granian.constants import Interfaces

    Granian(
        "cargohold.runtime:create_asgi_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=settings.workers,
        factory=True,
        respawn_failed_workers=True,
        workers_kill_timeout=settings.shutdown_timeout_seconds,
        log_access=False,
        log_level=settings.log_level,
    ).serve()


def _serve_uvicorn(settings) -> None:  # type: ignore[no-untyped-def]
    import uvicorn

    uvicorn.run(
        "cargohold.runtime:create_asgi_app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        factory=True,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        access_log=False,
        log_level=settings.log_level,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
