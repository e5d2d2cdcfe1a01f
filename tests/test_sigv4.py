"""Our SigV4 against AWS's published examples and against botocore on random requests."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from unittest import mock
from urllib.parse import quote

import pytest

from llmux_extproc.errors import GatewayError
from llmux_extproc.providers.auth import sigv4

pytest.importorskip("botocore")

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

# The AWS SigV4 test suite's credentials, scope and clock.
SUITE_CREDS = sigv4.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_TIME = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "method", "path", "query", "headers", "body", "signed", "signature"),
    [
        (
            "get-vanilla",
            "GET",
            "/",
            "",
            {},
            b"",
            "host;x-amz-date",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        ),
        (
            "post-vanilla",
            "POST",
            "/",
            "",
            {},
            b"",
            "host;x-amz-date",
            "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        ),
        (
            "get-vanilla-query-order-key-case",
            "GET",
            "/",
            "Param2=value2&Param1=value1",
            {},
            b"",
            "host;x-amz-date",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "get-utf8",
            "GET",
            "/ሴ",
            "",
            {},
            b"",
            "host;x-amz-date",
            "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
        ),
        (
            "get-space",
            "GET",
            "/example space/",
            "",
            {},
            b"",
            "host;x-amz-date",
            "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
        ),
        (
            "post-x-www-form-urlencoded",
            "POST",
            "/",
            "",
            {"Content-Type": "application/x-www-form-urlencoded"},
            b"Param1=value1",
            "content-type;host;x-amz-date",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
    ],
)
def test_aws_test_suite(
    name: str,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    signed: str,
    signature: str,
) -> None:
    added = sigv4.sign(
        method=method,
        host="example.amazonaws.com",
        path=path,
        query=query,
        headers=headers,
        body=body,
        credentials=SUITE_CREDS,
        region="us-east-1",
        service="service",
        now=SUITE_TIME,
    )
    assert added["x-amz-date"] == "20150830T123600Z"
    assert added["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders={signed}, Signature={signature}"
    )


def test_get_vanilla_canonical_request() -> None:
    text, signed = sigv4.canonical_request(
        "GET",
        "/",
        "",
        {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"},
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    )
    assert signed == "host;x-amz-date"
    assert text == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        "host;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_iam_documentation_example() -> None:
    # The ListUsers example from AWS's "Create a signed AWS API request" guide.
    added = sigv4.sign(
        method="GET",
        host="iam.amazonaws.com",
        path="/",
        query="Action=ListUsers&Version=2010-05-08",
        headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
        body=b"",
        credentials=SUITE_CREDS,
        region="us-east-1",
        service="iam",
        now=SUITE_TIME,
    )
    assert added["authorization"].endswith(
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


def test_bedrock_model_id_is_encoded_then_signed_double_encoded() -> None:
    segment = sigv4.encode_segment("anthropic.claude-3-5-sonnet-20240620-v1:0")
    assert segment == "anthropic.claude-3-5-sonnet-20240620-v1%3A0"
    path = f"/model/{segment}/converse"
    assert sigv4.canonical_path(path) == (
        "/model/anthropic.claude-3-5-sonnet-20240620-v1%253A0/converse"
    )
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude"
    assert "/" not in sigv4.encode_segment(arn)


def test_session_token_and_content_sha256_are_signed() -> None:
    creds = sigv4.Credentials("AKID", "secret", "token/with+chars=")
    added = sigv4.sign(
        method="POST",
        host="bedrock-runtime.us-east-1.amazonaws.com",
        path="/model/x/converse",
        body=b"{}",
        credentials=creds,
        region="us-east-1",
        service="bedrock",
        content_sha256=True,
        now=SUITE_TIME,
    )
    assert added["x-amz-security-token"] == "token/with+chars="
    assert added["x-amz-content-sha256"] == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert (
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"
        in (added["authorization"])
    )


def test_query_is_canonicalised() -> None:
    assert sigv4.canonical_query("b=2&a=x y&a=1&c") == "a=1&a=x%20y&b=2&c="
    assert sigv4.canonical_query("k=%7e%2F") == "k=~%2F"


def _random_text(rng: random.Random, alphabet: str, low: int = 1, high: int = 12) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


@pytest.mark.parametrize("seed", range(200))
def test_agrees_with_botocore(seed: int) -> None:
    rng = random.Random(seed)
    segment_chars = string.ascii_letters + string.digits + "-_.~:@!$&'()*+,;= %éሴ"
    segments = [_random_text(rng, segment_chars) for _ in range(rng.randint(0, 4))]
    segments = [s for s in segments if s not in (".", "..")]  # dot segments: not ours to send
    path = "/" + "/".join(sigv4.encode_segment(s) for s in segments)
    params = [
        (_random_text(rng, string.ascii_letters + "-_"), _random_text(rng, segment_chars, 0))
        for _ in range(rng.randint(0, 3))
    ]
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in params)
    headers = {
        f"x-test-{_random_text(rng, string.ascii_lowercase)}": _random_text(
            rng, string.ascii_letters + string.digits + string.punctuation + "   "
        ).strip()
        or "v"
        for _ in range(rng.randint(0, 3))
    }
    headers["content-type"] = rng.choice(["application/json", "text/plain;  charset=utf-8"])
    body = rng.randbytes(rng.randint(0, 300))
    host = rng.choice(["bedrock-runtime.us-east-1.amazonaws.com", "127.0.0.1:8443"])
    token = rng.choice([None, _random_text(rng, string.ascii_letters + "/+=", 10, 40)])
    creds = sigv4.Credentials(
        _random_text(rng, string.ascii_uppercase, 16, 20),
        _random_text(rng, string.ascii_letters + "/+", 40, 40),
        token,
    )
    region = rng.choice(["us-east-1", "eu-west-3", "ap-southeast-2"])
    service = rng.choice(["bedrock", "execute-api"])
    when = datetime.fromtimestamp(rng.randint(1_600_000_000, 1_900_000_000), UTC)
    method = rng.choice(["GET", "POST", "PUT"])

    ours = sigv4.sign(
        method=method,
        host=host,
        path=path,
        query=query,
        headers=headers,
        body=body,
        credentials=creds,
        region=region,
        service=service,
        now=when,
    )

    url = f"https://{host}{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    signer = SigV4Auth(
        Credentials(creds.access_key, creds.secret_key, creds.session_token), service, region
    )
    naive = when.replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=naive):
        signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]
    if token:
        assert ours["x-amz-security-token"] == request.headers["X-Amz-Security-Token"]


# -- credentials and region ------------------------------------------------------------------


def test_credentials_from_params_win_over_environment() -> None:
    env = {"AWS_ACCESS_KEY_ID": "ENV", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    creds = sigv4.credentials_for(
        {"aws_access_key_id": "CFG", "aws_secret_access_key": "cfgsecret"}, env
    )
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("CFG", "cfgsecret", None)


def test_credentials_from_environment_with_session_token() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "ENV",
        "AWS_SECRET_ACCESS_KEY": "envsecret",
        "AWS_SESSION_TOKEN": "tok",
    }
    creds = sigv4.credentials_for({}, env)
    assert (creds.access_key, creds.secret_key, creds.session_token) == ("ENV", "envsecret", "tok")


def test_credentials_os_environ_references() -> None:
    env = {"MY_KEY": "K", "MY_SECRET": "S"}
    params = {
        "aws_access_key_id": "os.environ/MY_KEY",
        "aws_secret_access_key": "os.environ/MY_SECRET",
    }
    creds = sigv4.credentials_for(params, env)
    assert (creds.access_key, creds.secret_key) == ("K", "S")


def test_missing_credentials_is_401() -> None:
    with pytest.raises(GatewayError) as info:
        sigv4.credentials_for({"aws_access_key_id": "only-the-id"}, {})
    assert info.value.status == 401
    assert "aws_secret_access_key" in info.value.message
    assert "secret" not in repr(sigv4.Credentials("a", "secret", "tok"))


def test_region_sources() -> None:
    host = "bedrock-runtime.eu-central-1.amazonaws.com"
    assert sigv4.region_for({"aws_region_name": "us-east-2"}, host, {}) == "us-east-2"
    assert sigv4.region_for({}, host, {"AWS_REGION": "ap-south-1"}) == "ap-south-1"
    assert sigv4.region_for({}, host, {"AWS_DEFAULT_REGION": "sa-east-1"}) == "sa-east-1"
    assert sigv4.region_for({}, host, {}) == "eu-central-1"
    with pytest.raises(GatewayError) as info:
        sigv4.region_for({}, "127.0.0.1", {})
    assert "aws_region_name" in info.value.message
