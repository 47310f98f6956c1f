"""Standard Webhooks signing: the service's signer and the router's verifier agree with the spec's vector."""

from __future__ import annotations

import base64

import pytest

from pipelines.webhook_signature import (
    InvalidSecretError,
    MissingHeaderError,
    SignatureMismatchError,
    TimestampError,
    WebhookSignatureError,
    WebhookVerificationError,
    sign,
    signature,
    verify,
)
from predictions_service.signing import signed_headers

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TS = 1614265330
BODY = b'{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def vector_headers() -> dict[str, str]:
    return {"webhook-id": MSG_ID, "webhook-timestamp": str(TS), "webhook-signature": EXPECTED}


def test_service_signer_matches_the_spec_vector():
    headers = signed_headers(SECRET, MSG_ID, TS, BODY)
    assert headers == vector_headers()


def test_router_signer_matches_the_spec_vector():
    assert signature(SECRET, MSG_ID, TS, BODY) == EXPECTED
    assert sign(SECRET, MSG_ID, TS, BODY) == vector_headers()
    assert sign(SECRET, MSG_ID, TS, BODY.decode())["webhook-signature"] == EXPECTED


def test_verify_accepts_the_spec_vector():
    assert verify(SECRET, vector_headers(), BODY, now=TS + 10) is None
    assert verify(SECRET, vector_headers(), BODY.decode(), now=TS - 299) is None


def test_verify_accepts_any_matching_entry_and_mixed_case_headers():
    headers = {
        "Webhook-Id": MSG_ID,
        "WEBHOOK-TIMESTAMP": str(TS),
        "webhook-signature": f"v1,bm90IGl0 v2,abc {EXPECTED}",
    }
    assert verify(SECRET, headers, BODY, now=TS) is None


def test_the_documented_wrong_key_does_not_verify():
    # Replicate's "complete example" keys the HMAC with the base64 text: that must not pass.
    import hashlib
    import hmac

    wrong = base64.b64encode(
        hmac.new(SECRET[6:].encode(), f"{MSG_ID}.{TS}.".encode() + BODY, hashlib.sha256).digest()
    ).decode()
    headers = {**vector_headers(), "webhook-signature": f"v1,{wrong}"}
    with pytest.raises(SignatureMismatchError):
        verify(SECRET, headers, BODY, now=TS)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_a_clear_error(missing):
    headers = vector_headers()
    del headers[missing]
    with pytest.raises(MissingHeaderError, match=missing):
        verify(SECRET, headers, BODY, now=TS)


def test_tampered_body_is_rejected():
    with pytest.raises(SignatureMismatchError, match="no webhook-signature entry matches"):
        verify(SECRET, vector_headers(), b'{"test": 2432232315}', now=TS)


def test_other_secret_is_rejected_without_leaking_it():
    other = "whsec_" + base64.b64encode(b"another key of 24 bytes!").decode()
    with pytest.raises(SignatureMismatchError) as info:
        verify(other, vector_headers(), BODY, now=TS)
    assert other[6:] not in str(info.value) and SECRET[6:] not in str(info.value)


@pytest.mark.parametrize("offset", [301, -301, 10_000])
def test_stale_or_future_timestamp_is_rejected(offset):
    with pytest.raises(TimestampError, match="tolerance 300"):
        verify(SECRET, vector_headers(), BODY, now=TS + offset)


def test_non_integer_timestamp_is_rejected():
    headers = {**vector_headers(), "webhook-timestamp": "yesterday"}
    with pytest.raises(TimestampError, match="not an integer"):
        verify(SECRET, headers, BODY, now=TS)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_***not base64***"])
def test_bad_secret_is_a_clear_error(secret):
    with pytest.raises(InvalidSecretError):
        verify(secret, vector_headers(), BODY, now=TS)


def test_error_hierarchy():
    assert WebhookVerificationError is WebhookSignatureError
    for cls in (MissingHeaderError, InvalidSecretError, TimestampError, SignatureMismatchError):
        assert issubclass(cls, WebhookSignatureError)
