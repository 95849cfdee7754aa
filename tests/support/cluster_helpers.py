"""Helpers of the cluster tests (issue 9): uploads to the local S3 server, a Ray head on loopback."""


def upload_folder(client, folder, bucket: str, prefix: str) -> None:
    """Every file under `folder` to s3://bucket/prefix/<relative path> (creating the bucket)."""
    from pathlib import Path

    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
