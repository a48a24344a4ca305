"""The S3 harness: boto3 over real HTTP to moto, isolated per test, and models through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from tests.harness.model_fixtures import TinyModelDirFactory
from tests.harness.s3 import MotoS3Server, S3Harness, download_prefix, list_keys, upload_directory

pytestmark = pytest.mark.integration

# Buckets handed out to the isolation tests below.
_seen_buckets: list[str] = []


def test_the_server_speaks_http_on_localhost(s3_server: MotoS3Server) -> None:
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    assert s3_server.port > 0


def test_put_get_list_round_trip(s3: S3Harness) -> None:
    s3.client.put_object(Bucket=s3.bucket, Key="data/a.jsonl", Body=b'{"text": "hi"}\n')
    s3.put_bytes("data/b.jsonl", b"")
    s3.put_bytes("other/c.txt", b"c")

    body = s3.client.get_object(Bucket=s3.bucket, Key="data/a.jsonl")["Body"].read()
    assert body == b'{"text": "hi"}\n'
    assert s3.get_bytes("data/b.jsonl") == b""
    assert s3.list_keys("data/") == ["data/a.jsonl", "data/b.jsonl"]
    assert s3.list_keys() == ["data/a.jsonl", "data/b.jsonl", "other/c.txt"]
    with pytest.raises(ClientError) as missing:
        s3.client.get_object(Bucket=s3.bucket, Key="nope")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"


def test_list_keys_follows_continuation_tokens(s3: S3Harness) -> None:
    for i in range(7):
        s3.put_bytes(f"many/{i:02d}", b"x")
    s3.put_bytes("manx", b"not under many/")
    keys = list_keys(s3.client, s3.bucket, "many/", page_size=3)  # three pages
    assert keys == [f"many/{i:02d}" for i in range(7)]


@pytest.mark.parametrize("round_", range(3))
def test_each_test_starts_from_an_empty_server(s3: S3Harness, round_: int) -> None:
    # Whichever of these runs second (in any order, on any worker) sees what the first left.
    names = [b["Name"] for b in s3.client.list_buckets()["Buckets"]]
    assert names == [s3.bucket], "the reset must remove earlier tests' buckets"
    assert s3.list_keys() == []
    assert s3.bucket not in _seen_buckets, "every test gets a new bucket name"
    _seen_buckets.append(s3.bucket)
    s3.put_bytes("leftover.txt", f"from round {round_}".encode())
    s3.create_bucket("leftover")


def test_environment_is_what_a_user_sets_and_nothing_else(s3: S3Harness) -> None:
    assert s3.env == {
        "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
    }
    for name, value in s3.env.items():
        assert os.environ[name] == value
    assert "AWS_PROFILE" not in os.environ
    assert not Path(os.environ["AWS_CONFIG_FILE"]).exists()
    assert not Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).exists()

    # A client built the way user code builds it — no endpoint or keys in code — reaches moto.
    client = boto3.session.Session().client("s3")
    assert client.meta.endpoint_url == s3.endpoint_url
    client.put_object(Bucket=s3.bucket, Key="from-env.txt", Body=b"ok")
    assert s3.get_bytes("from-env.txt") == b"ok"


def test_real_aws_configuration_does_not_leak_in(s3_no_ambient_credentials: S3Harness) -> None:
    harness = s3_no_ambient_credentials
    for name in (*harness.env, "AWS_PROFILE", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        assert name not in os.environ, name
    # With nothing ambient, a default client finds no credentials (and does not hang on IMDS).
    client = boto3.session.Session().client("s3", endpoint_url=harness.endpoint_url, region_name="us-east-1")
    with pytest.raises(NoCredentialsError):
        client.list_buckets()


def test_credentials_reach_a_subprocess_only_through_the_env_it_is_given(
    s3_no_ambient_credentials: S3Harness,
) -> None:
    harness = s3_no_ambient_credentials
    harness.put_bytes("hello.txt", b"hello from the test")
    script = (
        "import boto3, sys\n"
        "body = boto3.client('s3').get_object(Bucket=sys.argv[1], Key='hello.txt')['Body'].read()\n"
        "sys.stdout.write(body.decode())\n"
    )
    # The pod's view: the scrubbed process environment plus the secret-derived variables.
    env = {**os.environ, **harness.env}
    done = subprocess.run(
        [sys.executable, "-c", script, harness.bucket],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from the test"


def test_extra_buckets_and_uris(s3: S3Harness) -> None:
    other = s3.create_bucket("replay-data")
    assert other.startswith("replay-data-") and other != s3.bucket
    s3.put_bytes("x", b"1", bucket=other)
    assert s3.list_keys(bucket=other) == ["x"]
    assert s3.list_keys() == []
    assert s3.uri("models/bot/") == f"s3://{s3.bucket}/models/bot/"


def test_upload_and_download_a_directory(s3: S3Harness, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "nested" / "deeper").mkdir(parents=True)
    (source / "top.txt").write_text("top")
    (source / "nested" / "deeper" / "leaf.bin").write_bytes(bytes(range(256)))

    uri = s3.upload_dir(source, "/runs/1/model")
    assert uri == f"s3://{s3.bucket}/runs/1/model/"
    assert s3.list_keys("runs/") == ["runs/1/model/nested/deeper/leaf.bin", "runs/1/model/top.txt"]
    assert upload_directory(s3.client, s3.bucket, source) == ["nested/deeper/leaf.bin", "top.txt"]

    files = download_prefix(s3.client, s3.bucket, "runs/1/model", tmp_path / "dst")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in files) == [
        "nested/deeper/leaf.bin",
        "top.txt",
    ]
    assert (tmp_path / "dst" / "nested" / "deeper" / "leaf.bin").read_bytes() == bytes(range(256))


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_a_model_uploaded_to_s3_loads_after_download(
    family: str, s3: S3Harness, tmp_path: Path, tiny_model_dir: TinyModelDirFactory
) -> None:
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from tests.harness.tiny_models import upload_tiny_model

    uri = upload_tiny_model(
        family,  # type: ignore[arg-type]
        s3.client,
        s3.bucket,
        f"base-models/{family}",
        source_dir=tiny_model_dir(family),  # type: ignore[arg-type]
    )
    assert uri == f"s3://{s3.bucket}/base-models/{family}/"
    keys = s3.list_keys(f"base-models/{family}/")
    assert f"base-models/{family}/model.safetensors" in keys
    assert f"base-models/{family}/tokenizer.json" in keys

    local = tmp_path / "downloaded"
    s3.download(f"base-models/{family}/", local)
    config = AutoConfig.from_pretrained(local)
    model = AutoModel.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert config.model_type == family
    original = AutoModel.from_pretrained(tiny_model_dir(family))  # type: ignore[arg-type]
    for (name, p), (_, q) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert tokenizer("hello there")["input_ids"]


def test_upload_tiny_model_builds_when_no_directory_is_given(s3: S3Harness, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tests.harness.tiny_models import upload_tiny_model

    uri = upload_tiny_model("bert", s3.client, s3.bucket, "m/bert3", num_labels=3)
    assert uri == f"s3://{s3.bucket}/m/bert3/"
    s3.download("m/bert3", tmp_path)
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path).config.num_labels == 3
