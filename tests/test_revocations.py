"""Revocations: the same answers as a plain scan, with expiry that does not scan."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from wsgate.auth.authenticator import Revocations
from wsgate.auth.tokens import Identity, TokenSource

SUBJECT_TTL = 50.0


class Reference:
    """The obvious implementation: scan everything on every check."""

    def __init__(self) -> None:
        self.jti: dict[str, float] = {}
        self.subjects: dict[tuple[str | None, str], float] = {}

    def revoke_token(self, jti: str, until: float) -> None:
        self.jti[jti] = max(until, self.jti.get(jti, until))

    def revoke_subject(self, key: tuple[str | None, str], now: float) -> None:
        self.subjects[key] = now

    def is_revoked(self, identity: Identity, now: float) -> bool:
        self.jti = {j: u for j, u in self.jti.items() if u >= now}
        self.subjects = {k: at for k, at in self.subjects.items() if at + SUBJECT_TTL >= now}
        if identity.token_id is not None and identity.token_id in self.jti:
            return True
        at = self.subjects.get(identity.user_key)
        return at is not None and (identity.issued_at is None or identity.issued_at <= at)


JTIS = st.sampled_from(["a", "b", "c", "d"])
SUBJECTS = st.sampled_from(["alice", "bob", "carol"])
operation = st.one_of(
    st.tuples(st.just("token"), JTIS, st.floats(0, 100)),
    st.tuples(st.just("subject"), SUBJECTS, st.just(0.0)),
    st.tuples(st.just("check"), JTIS, st.floats(-20, 20)),
    st.tuples(st.just("wait"), SUBJECTS, st.floats(0, 30)),
)


@settings(max_examples=300)
@given(st.lists(operation, max_size=60), SUBJECTS)
def test_answers_like_a_full_scan(ops: list[tuple[str, str, float]], subject: str) -> None:
    ours, reference = Revocations(subject_ttl=SUBJECT_TTL), Reference()
    now = 0.0
    for op, name, value in ops:
        if op == "token":
            ours.revoke_token(name, now + value)
            reference.revoke_token(name, now + value)
        elif op == "subject":
            ours.revoke_subject((None, name), now)
            reference.revoke_subject((None, name), now)
        elif op == "wait":
            now += value
        else:
            identity = Identity(
                subject=subject,
                expires_at=now + 100,
                source=TokenSource.HEADER,
                issued_at=now + value,
                token_id=name,
            )
            assert ours.is_revoked(identity, now) == reference.is_revoked(identity, now)
            assert len(ours) == len(reference.jti) + len(reference.subjects)


def test_expired_revocations_are_forgotten_without_a_scan() -> None:
    revocations = Revocations(subject_ttl=SUBJECT_TTL)
    for n in range(10_000):
        revocations.revoke_token(f"jti-{n}", until=float(n))
    someone = Identity(subject="x", expires_at=1e6, source=TokenSource.HEADER, token_id="jti-9999")
    assert revocations.is_revoked(someone, now=5_000.0)
    assert len(revocations) == 5_000  # those that stopped mattering before now are gone
    assert not revocations.is_revoked(someone, now=10_000.5)
    assert len(revocations) == 0


def test_a_token_revoked_again_for_longer_stays_revoked_until_the_later_time() -> None:
    revocations = Revocations()
    token = Identity(subject="x", expires_at=1e6, source=TokenSource.HEADER, token_id="j")
    revocations.revoke_token("j", until=10.0)
    revocations.revoke_token("j", until=50.0)
    revocations.revoke_token("j", until=30.0)  # never shortens
    assert revocations.is_revoked(token, now=40.0)
    assert not revocations.is_revoked(token, now=50.5)
