"""OAuth state of the simulator: sessions, access/refresh tokens and WebSocket tokens.

No aiohttp here: the HTTP layer parses the request and calls :class:`TokenStore`, which
raises :class:`~faxd.sim.common.ApiError` with RingCentral's OAuth error shapes.
Lifetimes are measured on the event loop clock (``Timers.now``), so they follow fake time.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from faxd.sim.common import ApiError, JsonDict, api_error, iso, new_token, oauth_error, plus_seconds
from faxd.sim.config import SimConfig

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPE = "ReadMessages Faxes EditMessages WebSocket SubscriptionWebSocket ReadAccounts"


@dataclass
class OAuthSession:
    id: str
    owner_id: str
    endpoint_id: str
    created: float
    revoked: bool = False
    access_tokens: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)


@dataclass
class AccessToken:
    value: str
    session_id: str
    expires_at: float
    invalidated: bool = False


@dataclass
class RefreshToken:
    value: str
    session_id: str
    expires_at: float
    used: bool = False


@dataclass
class WsToken:
    value: str
    session_id: str
    owner_id: str
    expires_at: float


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _int_param(form: dict[str, str], name: str) -> int | None:
    raw = form.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(
            400, oauth_error("invalid_request", "OAU-101", f"Parameter [{name}] is invalid")
        ) from None


class TokenStore:
    """All OAuth sessions and tokens the simulator has issued."""

    def __init__(self, config: SimConfig, clock: Callable[[], float], wall: Callable[[], datetime]) -> None:
        self._config = config
        self._clock = clock
        self._wall = wall
        self.sessions: dict[str, OAuthSession] = {}
        self._access: dict[str, AccessToken] = {}
        self._refresh: dict[str, RefreshToken] = {}
        self._ws: dict[str, WsToken] = {}
        #: the ``scope`` of token replies: the app's permissions (a fault may take some away)
        self.scope = SCOPE

    # -- client authentication -------------------------------------------------------------
    def check_client(self, authorization: str | None, form: dict[str, str]) -> None:
        """Basic client auth (client_secret_basic), or a bare ``client_id`` in the body."""
        if authorization:
            scheme, _, creds = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise ApiError(
                    401,
                    oauth_error("invalid_client", "OAU-123", "Invalid Authorization header value: scheme"),
                )
            try:
                decoded = base64.b64decode(creds.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ApiError(
                    401, oauth_error("invalid_client", "OAU-134", "Invalid Authorization header")
                ) from None
            cid, _, secret = decoded.partition(":")
            if cid != self._config.client_id or secret != self._config.client_secret:
                raise ApiError(401, oauth_error("invalid_client", "OAU-146", "Invalid client credentials"))
            body_cid = form.get("client_id")
            if body_cid is not None and body_cid != cid:
                raise ApiError(401, oauth_error("invalid_client", "OAU-146", "Invalid client credentials"))
            return
        body_cid = form.get("client_id")
        if body_cid is None:
            raise ApiError(
                401,
                oauth_error("invalid_client", "OAU-123", "Client authentication is required"),
            )
        if body_cid != self._config.client_id:
            raise ApiError(401, oauth_error("invalid_client", "OAU-120", "Wrong Application ID"))

    # -- grants ----------------------------------------------------------------------------
    def token(self, authorization: str | None, form: dict[str, str]) -> JsonDict:
        """``POST /restapi/oauth/token``: JWT bearer and refresh_token grants."""
        self.check_client(authorization, form)
        grant = form.get("grant_type")
        access_ttl = self._ttl(_int_param(form, "access_token_ttl"), self._config.access_token_ttl, 600, 3600)
        refresh_ttl = self._ttl(
            _int_param(form, "refresh_token_ttl"), self._config.refresh_token_ttl, 1, 2592000
        )
        if grant == JWT_GRANT:
            assertion = form.get("assertion")
            if not assertion:
                raise ApiError(
                    400,
                    oauth_error("invalid_request", "OAU-101", "Parameter [assertion] is required"),
                )
            if assertion != self._config.jwt:
                raise ApiError(
                    400,
                    oauth_error("invalid_grant", "OAU-140", "Invalid resource owner credentials"),
                )
            now = self._clock()
            session = OAuthSession(
                id=new_token("S"),
                owner_id=self._config.owner_extension,
                endpoint_id=new_token("E")[:23],
                created=now,
            )
            self.sessions[session.id] = session
            return self._issue(session, access_ttl, refresh_ttl)
        if grant == "refresh_token":
            value = form.get("refresh_token")
            if not value:
                raise ApiError(
                    400,
                    oauth_error("invalid_request", "OAU-101", "Parameter [refresh_token] is required"),
                )
            rt = self._refresh.get(value)
            found = self.sessions.get(rt.session_id) if rt is not None else None
            if rt is None or found is None or found.revoked:
                raise ApiError(400, oauth_error("invalid_grant", "OAU-211", "Token not found"))
            if rt.used:
                raise ApiError(400, oauth_error("invalid_grant", "OAU-211", "Token is revoked"))
            if self._clock() >= rt.expires_at:
                raise ApiError(400, oauth_error("invalid_grant", "OAU-211", "Token expired"))
            rt.used = True
            # The previous access tokens of the session die at once.
            for at_value in found.access_tokens:
                self._access[at_value].invalidated = True
            return self._issue(found, access_ttl, refresh_ttl)
        raise ApiError(
            400,
            oauth_error("unsupported_grant_type", "OAU-112", f"Unsupported grant type: [{grant or ''}]"),
        )

    @staticmethod
    def _ttl(requested: int | None, configured: int, low: int, high: int) -> int:
        if requested is None:
            return configured
        return min(configured, _clamp(requested, low, high))

    def _issue(self, session: OAuthSession, access_ttl: int, refresh_ttl: int) -> JsonDict:
        now = self._clock()
        at = AccessToken(new_token("AT"), session.id, now + access_ttl)
        rt = RefreshToken(new_token("RT"), session.id, now + refresh_ttl)
        self._access[at.value] = at
        self._refresh[rt.value] = rt
        session.access_tokens.add(at.value)
        session.refresh_tokens.add(rt.value)
        return {
            "access_token": at.value,
            "token_type": "bearer",
            "expires_in": access_ttl,
            "refresh_token": rt.value,
            "refresh_token_expires_in": refresh_ttl,
            "scope": self.scope,
            "owner_id": session.owner_id,
            "endpoint_id": session.endpoint_id,
            "session_id": session.id,
            "session_expiration_time": iso(plus_seconds(self._wall(), refresh_ttl)),
            "session_expires_in": refresh_ttl,
            "session_idle_timeout": refresh_ttl,
        }

    def revoke(self, authorization: str | None, form: dict[str, str]) -> None:
        """``POST /restapi/oauth/revoke``: revoking any token kills the whole OAuth session."""
        if authorization or "client_id" in form:
            self.check_client(authorization, form)
        value = form.get("token")
        if not value:
            raise ApiError(400, oauth_error("invalid_request", "OAU-101", "Parameter [token] is required"))
        token = self._access.get(value) or self._refresh.get(value)
        if token is None:
            return  # RingCentral answers 200 for unknown tokens too (RFC 7009)
        session = self.sessions.get(token.session_id)
        if session is not None:
            self._kill(session)

    def _kill(self, session: OAuthSession) -> None:
        session.revoked = True
        for v in session.access_tokens:
            self._access[v].invalidated = True
        for v in session.refresh_tokens:
            self._refresh[v].used = True
        for ws in [w for w in self._ws.values() if w.session_id == session.id]:
            del self._ws[ws.value]

    # -- bearer checks ---------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> AccessToken:
        """Check ``Authorization: Bearer <at>`` (scheme case-insensitive) of an API call."""
        if not authorization:
            raise ApiError(401, api_error("OAU-123", "Authorization header is not specified"))
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, api_error("OAU-134", "Invalid Authorization header"))
        at = self._access.get(value.strip())
        if at is None:
            raise ApiError(401, api_error("OAU-129", "Access token corrupted"))
        if at.invalidated or self._clock() >= at.expires_at:
            raise ApiError(401, api_error("OAU-128", "Access token expired"))
        return at

    def owner_of(self, at: AccessToken) -> str:
        return self.sessions[at.session_id].owner_id

    def issue_ws_token(self, at: AccessToken, ws_url: str) -> JsonDict:
        """``POST /restapi/oauth/wstoken``."""
        session = self.sessions[at.session_id]
        ttl = self._config.ws_token_ttl
        ws = WsToken(new_token("WSAT"), session.id, session.owner_id, self._clock() + ttl)
        self._ws[ws.value] = ws
        return {"uri": ws_url, "ws_access_token": ws.value, "expires_in": ttl}

    def check_ws_token(self, value: str) -> WsToken | None:
        """A ws token is reusable within its lifetime (as @rc-ex/ws expects)."""
        ws = self._ws.get(value)
        if ws is None or self._clock() >= ws.expires_at:
            return None
        session = self.sessions.get(ws.session_id)
        if session is None or session.revoked:
            return None
        return ws

    def expire_ws_tokens(self) -> int:
        """Fault: every ws token issued so far is expired now (the gateway refuses it: WSG-401)."""
        now = self._clock()
        count = 0
        for ws in self._ws.values():
            if ws.expires_at > now:
                ws.expires_at = now
                count += 1
        return count

    def expire_access_tokens(self) -> int:
        """Fault: every access token issued so far is expired now (refresh tokens still work)."""
        now = self._clock()
        count = 0
        for at in self._access.values():
            if not at.invalidated and at.expires_at > now:
                at.expires_at = now
                count += 1
        return count
