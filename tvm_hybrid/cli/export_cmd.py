"""`tvm-hybrid export`: cloud artifacts for other serving engines (Triton, KServe)."""

from __future__ import annotations

import click

from .output import emit_json


@click.group("export")
def command() -> None:
    """Export cloud artifacts for serving engines that scale out.

    \b
    tvm-hybrid export triton dist/cloud-x86 -o model_repository/
    """


@command.command("triton")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="The model repository to write.")
@click.option("--storage-uri", metavar="URI",
              help="Where KServe finds the repository (s3://, gs://, pvc://...)  [default: pvc://tvm-hybrid-models/<DIR>].")
@click.option("--name", help="The InferenceService's name  [default: tvm-hybrid-<first model>].")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Triton model instances per model (CPU).")
@click.option("--force", is_flag=True, help="Write into a non-empty directory.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def triton(artifacts: tuple[str, ...], output: str, storage_uri: str | None, name: str | None, instances: int,
           force: bool, as_json: bool) -> None:  # fmt: skip
    """A Triton model repository (ONNX segments + config.pbtxt) and a KServe InferenceService.

    \b
    tvm-hybrid export triton dist/cloud-x86 -o repo/ --storage-uri s3://bucket/repo
    tritonserver --model-repository repo/      # or: kubectl apply -f repo/inferenceservice.yaml
    """
    from ..compiler.triton import export_triton

    doc = export_triton(list(artifacts), output, storage_uri=storage_uri, name=name, instances=instances, force=force)
    if as_json:
        emit_json(doc)
        return
    for model, versions in doc["models"].items():
        click.echo(f"{output}/{model}: versions {', '.join(versions)}")
    click.echo(f"{doc['inference_service']}: InferenceService {doc['name']} reading {doc['storage_uri']}")
