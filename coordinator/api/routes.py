"""HTTP routes. Every inference route goes through :func:`Api.inference`, one path.

The walk: auth -> size limit -> tool-schema normalization -> parse and
validate -> traits -> dispatch (fail-fast, queue, attempts, commit) ->
stream or assemble. Headers only leave once the dispatch has committed:
the handler does not return until then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from coordinator import errors, sizes
from coordinator.accounts import keys
from coordinator.accounts.service import UNNAMED, Account, Accounts, Refused
from coordinator.accounts.store import UNNAMED as UNNAMED_KEY
from coordinator.accounts.store import StoreUnavailable
from coordinator.config import Config
from coordinator.credentials import matches_any
from coordinator.dispatch.attempt import Dispatcher
from coordinator.dispatch.chunks import is_delta
from coordinator.dispatch.items import End, InBandError
from coordinator.dispatch.relay import Relay
from coordinator.dispatch.request import Committed, DispatchFailed, RequestContext
from coordinator.dispatch.timing import Timing
from coordinator.lifecycle import Drain
from coordinator.metrics import Metrics
from coordinator.protocol import Usage
from coordinator.protocol.endpoints import Endpoint, inner_request
from coordinator.providers.identity import IdentityBook, PinStoreUnavailable, SharedPins, Unpin
from coordinator.registry.actor import RegistryClient, RegistryFault
from coordinator.registry.table import Job
from coordinator.registry.traits import estimate_prompt_tokens, traits_of
from coordinator.toolschema import normalize_tool_schemas
from coordinator.untrusted import printable

from . import exchange, sse
from .assemble import assemble
from .errors import Family, family_of, render
from .outcomes import admission_error, collect, dispatch_error
from .requestlog import RequestRecord, Result
from .requests import ParsedRequest, parse_body, validate
from .status import group_failovers, render_sign_in, render_status
from .status_sessions import COOKIE, COOKIE_PATH, StatusSessions

log = logging.getLogger(__name__)

# Bodies larger than this are parsed in a worker thread (Api._prepare).
PARSE_IN_THREAD_BYTES = 256 * 1024


@attrs.define(eq=False, kw_only=True)
class Api:
    # Collaborators are named and required: a private default would split their state.
    config: Config
    registry: RegistryClient
    dispatcher: Dispatcher
    metrics: Metrics
    identities: IdentityBook
    drain: Drain
    shared: Any  # cluster/shared.py: its status shows on /healthz and /status
    pins: SharedPins | None  # with several instances: the fleet-wide pins
    status_sessions: StatusSessions = attrs.field(factory=StatusSessions)  # browsers on /status
    accounts: Accounts | None = None  # named keys, limits, the ledger (None: the static keys)
    _parse_threads: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False)

    # -- auth
    def _authorized(self, keys: tuple[str, ...]) -> bool:
        # An empty key list authorizes nobody; `coordinator serve` generates a key.
        return matches_any(_offered_key(), keys)

    def _account(self) -> Account | None:
        """Who the request comes from: a named key or a static one; None: nobody."""
        if self.accounts is not None:
            return self.accounts.authenticate(_offered_key())
        return UNNAMED if self._authorized(self.config.api_keys) else None

    def _admin(self, *, in_url: bool = True) -> errors.ApiError | None:
        """None for a request carrying an admin key (header, or ``?key=`` where allowed).

        ``in_url=False`` for what changes state, and for the status page: a key in a
        URL ends up in logs and histories, and a link must not be able to act."""
        if not self.config.admin_keys:
            return errors.ApiError(403, "no admin key is configured", "permission_error",
                                   "admin_disabled")
        if self._authorized(self.config.admin_keys) or (in_url and matches_any(
                request.args.get("key", ""), self.config.admin_keys)):
            return None
        return errors.ApiError(401, "admin key required", "authentication_error", "admin_only")

    # -- the one inference path
    async def inference(self, endpoint: Endpoint) -> Response:
        timing = Timing(started=trio.current_time())
        record = RequestRecord(uuid.uuid4().hex[:16], endpoint.value, timing)
        try:
            response = await self._inference(endpoint, record)
        except errors.ApiError as exc:
            record.failed(exc.status, exc.code or exc.type)
            response = error_response(exc, family_of(endpoint.value))
        except RegistryFault:
            # The actor has logged the fault; this request gets a clean 500.
            record.failed(500, "internal_error")
            response = error_response(errors.ApiError(
                500, "internal error", "server_error", "internal_error"),
                family_of(endpoint.value))
        finally:
            # A stream's outcome is known only when it is over: its exchange logs it then,
            # and the stream closes its reservation. Any other request is over here: a
            # reservation still open (an error, a cancellation) is refunded. A whole
            # answer is a success only once it has left: its exchange logs it then.
            if not record.streaming:
                owner = exchange.current()
                if owner is not None and record.result is Result.SUCCESS:
                    owner.record = record  # its charge too waits for the answer to leave
                else:
                    if self.accounts is not None:
                        self.accounts.refund(record.request_id)
                    record.write()
        self.metrics.requests.labels(endpoint.value, str(response.status_code)).inc()
        return response

    async def _inference(self, endpoint: Endpoint, record: RequestRecord) -> Response:
        account = self._account()
        if account is None:
            raise errors.unauthorized()
        record.key = account.name or UNNAMED_KEY
        raw = await _read_body(self.config.max_body_bytes)
        timing = record.timing
        if len(raw) > PARSE_IN_THREAD_BYTES:
            # Seconds of pure Python for a large body of an odd shape: in a worker
            # thread, the event loop (every other request) keeps its turns.
            # One such thread at a time: under the GIL more would only take more turns
            # from the event loop, not finish sooner.
            parsed, plaintext, job = await trio.to_thread.run_sync(
                self._prepare, endpoint, raw, record.request_id, limiter=self._parse_threads)
        else:
            parsed, plaintext, job = self._prepare(endpoint, raw, record.request_id)
        record.model = parsed.model
        limit_headers = await self._admit(account, record, job, parsed)
        ctx = RequestContext(job, endpoint, plaintext, parsed.stream, timing)
        timing.parse = trio.current_time() - timing.started
        relay = await self._dispatch(ctx, record)
        committed = relay.committed
        record.provider = committed.racer.lease.provider_id
        headers = {
            **limit_headers,
            "X-Provider-Id": committed.racer.lease.provider_id,
            "X-Provider-Version": committed.racer.lease.version,
            "X-Attempts": str(committed.attempts),
            "X-Timing": timing.header(),
            "X-Request-Id": record.request_id,
        }
        instance = committed.racer.connection.instance if committed.racer.connection else ""
        if instance:  # a provider connected to another instance (docs/scale-out.md)
            headers["X-Provider-Instance"] = instance
            record.instance = instance
        if not parsed.stream:
            chunks, usage = await collect(relay, self.metrics, self.config.max_response_bytes)
            if any(is_delta(endpoint, chunk) for chunk in chunks):  # an empty answer is free
                charge = partial(self._charge, record, usage.prompt_tokens,
                                 usage.completion_tokens)
                owner = exchange.current()
                if owner is None:  # in-process: nothing between the answer and its consumer
                    charge()
                else:  # once it has left (a consumer that never takes it pays nothing)
                    owner.on_delivered(charge)
            record.result, record.status = Result.SUCCESS, 200
            body = assemble(endpoint, chunks, usage, record.request_id)
            return Response(json.dumps(body), 200, headers, content_type="application/json")
        record.status, record.streaming = 200, True
        response = Response(
            self._sse(endpoint, relay, record, exchange.current()),
            200,
            {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            content_type="text/event-stream",
        )
        response.timeout = None
        return response

    async def _admit(self, account: Account, record: RequestRecord, job: Job,
                     parsed: ParsedRequest) -> dict[str, str]:
        """Reserve the request's token bound against its key's limits; the rate headers.

        Before any dispatch: a request over a limit costs no provider anything."""
        if self.accounts is None:
            return {}
        if parsed.max_tokens_given:
            reserved = ceiling = parsed.max_tokens
        else:  # the engine's own limit decides: reserve a default, charge what it says
            reserved, ceiling = self.config.token_bound_default, self.config.max_tokens_limit
        admission = await self.accounts.admit(account, record.request_id, parsed.model,
                                              job.prompt_tokens, reserved, ceiling)
        if isinstance(admission, Refused):
            self.metrics.throttled.labels(_refusal_label(admission)).inc()
            raise admission_error(admission)
        owner = exchange.current()
        if owner is not None:  # however the response ends, the reservation is closed
            accounts = self.accounts
            owner.on_finish(lambda: accounts.refund(record.request_id))
        return admission.headers

    def _charge(self, record: RequestRecord, prompt_tokens: int, completion_tokens: int) -> None:
        """Settle the request's reservation: what it used (clamped, accounts/ledger.py)."""
        if self.accounts is not None:
            self.accounts.settle(record.request_id, record.provider, prompt_tokens,
                                 completion_tokens)

    def _prepare(self, endpoint: Endpoint, raw: bytes,
                 request_id: str) -> tuple[ParsedRequest, bytes, Job]:
        """The body read, repaired, parsed and checked; what the provider gets; the job.

        Pure and thread-safe: called in a worker thread for large bodies."""
        raw = normalize_tool_schemas(raw, limit=self.config.max_body_bytes)
        parsed = validate(endpoint, parse_body(raw, self.config.max_json_depth),
                          max_tokens_limit=self.config.max_tokens_limit)
        plaintext = inner_request(parsed.body, endpoint)
        job = Job(
            request_id=request_id,
            model=parsed.model,
            traits=traits_of(parsed.body),
            prompt_tokens=estimate_prompt_tokens(parsed.body, self.config.image_prompt_tokens),
            max_tokens=parsed.max_tokens,
            allowlist=parsed.allowlist,
            request_bytes=sizes.request_frame_bound(len(plaintext)),
            endpoint=endpoint.value,
        )
        return parsed, plaintext, job

    async def _dispatch(self, ctx: RequestContext, record: RequestRecord) -> Relay:
        """Dispatch; the winner's relay is made at the commit, and owned by the request."""
        owner = exchange.current()
        relays: list[Relay] = []

        def handover(winner: Committed) -> None:
            relays.append(Relay(self.dispatcher, winner))
            if owner is not None:  # the request owns it, however the response ends
                owner.own(relays[-1])

        try:
            await self.dispatcher.dispatch(ctx, handover)
        except DispatchFailed as exc:
            raise dispatch_error(exc) from None
        finally:
            record.attempts, record.providers_tried = ctx.attempts, ctx.providers_tried
        return relays[-1]

    async def _sse(self, endpoint: Endpoint, relay: Relay, record: RequestRecord,
                   owner: exchange.Exchange | None) -> AsyncIterator[bytes]:
        """The stream's SSE bytes, a batch per write; the reservation closed as it ends."""
        writer = sse.SseWriter(endpoint)
        record.result = Result.CLIENT_GONE
        delivered = 0  # pieces of the answer given to the consumer: a cut stream's tokens
        ended: Usage | None = None  # the provider's count, once its end has been given too
        try:
            async with contextlib.aclosing(relay.batches()) as batches:
                async for batch in batches:
                    match batch.ending:
                        case InBandError() as error:
                            self.metrics.inband_errors.labels(error.reason.value).inc()
                            _log_inband(relay.committed.racer.lease.provider_id, error)
                            record.result, record.error = Result.INBAND_ERROR, error.reason.value
                        case End():
                            record.result = Result.SUCCESS
                    data = b"".join(writer.frame(item) for item in batch.items)
                    if data:
                        if batch.last and owner is not None:  # out with the end, at once
                            owner.last_part_next()
                        yield data
                        delivered += sum(1 for item in batch.items
                                         if isinstance(item, dict) and is_delta(endpoint, item))
                    if isinstance(batch.ending, End):
                        ended = batch.ending.usage
        finally:
            self._close_stream(record, relay.committed.prompt_tokens, delivered, ended)
            if owner is not None:  # written once the server has (or has not) sent the end
                owner.record = record
            else:
                record.write()

    def _close_stream(self, record: RequestRecord, prompt_estimate: int, delivered: int,
                      ended: Usage | None) -> None:
        """A stream's reservation, closed by how it ended: nothing delivered (an empty
        answer included) is refunded; a whole answer is charged the provider's count; one
        cut short (an in-band error, the consumer gone) the prompt and what it got."""
        if not delivered:
            if self.accounts is not None:
                self.accounts.refund(record.request_id)
        elif ended is not None:
            self._charge(record, ended.prompt_tokens, ended.completion_tokens)
        else:
            self._charge(record, prompt_estimate, delivered)

    # -- the rest of the surface
    async def models(self) -> Response:
        if self._account() is None:
            return error_response(errors.unauthorized(), Family.OPENAI)
        # Asked for the names alone: a model list must not cost a full snapshot of a
        # 10,000-provider table.
        served = await self.registry.models()
        return json_response({"object": "list", "data": [_model_entry(m) for m in served]})

    async def model(self, model_id: str) -> Response:
        """``models.retrieve``: one model some connected provider serves now, as listed."""
        if self._account() is None:
            return error_response(errors.unauthorized(), Family.OPENAI)
        if not await self.registry.serves(model_id):
            return error_response(errors.not_found(
                f"the model {model_id[:256]!r} does not exist or is not served"), Family.OPENAI)
        return json_response(_model_entry(model_id))

    async def healthz(self) -> Response:
        census = await self.registry.census()
        draining = self.drain.draining
        return json_response({"status": "draining" if draining else "ok",
                              "providers": census.providers, "queue_depth": census.queued,
                              "cluster": self._cluster()}, 503 if draining else 200)

    def _cluster(self) -> str:
        """``solo`` (one process), or ``ok`` / ``degraded`` (Redis unreachable)."""
        return str(self.shared.status) if self.shared is not None else "solo"

    async def metrics_page(self) -> Response:
        return Response(self.metrics.render(), 200,
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    async def status_page(self) -> Response:
        """HTML status: for the admin key in a header (scripts), a browser signed in with
        it (a session cookie), or anyone if ``status_public``. Never a key in the URL: it
        stays in browser histories and proxy logs.

        Never "anyone on loopback": behind a reverse proxy on the same host,
        every request comes from loopback.
        """
        signed_in = self._status_session()
        if not (self.config.status_public or signed_in):
            refused = self._admin(in_url=False)
            if refused is not None:
                return self._status_refusal(refused)
        now = trio.current_time()
        page = render_status((await self.registry.snapshot()).as_json(),
                             group_failovers(self.dispatcher.failovers, now),
                             self._cluster(), signed_in=signed_in,
                             keys=self.accounts.status_rows() if self.accounts else None)
        return _html(page)

    def _status_session(self) -> bool:
        token = request.cookies.get(COOKIE, "")
        return self.status_sessions.valid(token, trio.current_time())

    def _status_refusal(self, refused: errors.ApiError, *, wrong_key: bool = False
                        ) -> Response:
        """A browser (it asks for HTML) gets the sign-in form; a script, the JSON error."""
        if refused.status == 401 and "text/html" in request.headers.get("accept", ""):
            return _html(render_sign_in(refused=wrong_key), 401)
        return error_response(refused, Family.OPENAI)

    async def status_login(self) -> Response:
        """The sign-in form's POST: the admin key in the body; a session cookie for it."""
        try:
            raw = await _read_body(STATUS_FORM_BYTES)
            fields = urllib.parse.parse_qs(raw.decode("utf-8", "replace"), max_num_fields=4)
        except errors.ApiError as exc:  # too large, or not arriving
            return error_response(exc, Family.OPENAI)
        except ValueError:  # more fields than a sign-in form has
            return error_response(errors.bad_request(
                "a sign-in form has one field, 'key'", param="key"), Family.OPENAI)
        key = (fields.get("key") or [""])[0]
        if not self.config.admin_keys:
            return self._status_refusal(self._admin() or errors.unauthorized())
        if not matches_any(key, self.config.admin_keys):
            log.warning("status page: sign-in with a wrong admin key")
            return self._status_refusal(errors.ApiError(
                401, "that is not an admin key", "authentication_error", "admin_only"),
                wrong_key=True)
        token = self.status_sessions.open(trio.current_time())
        response = _see_status()
        response.set_cookie(
            COOKIE, token, max_age=int(self.status_sessions.ttl),
            path=COOKIE_PATH, secure=request.scheme == "https",
            httponly=True, samesite="Strict")
        return response

    async def status_logout(self) -> Response:
        self.status_sessions.close(request.cookies.get(COOKIE, ""))
        response = _see_status()
        response.delete_cookie(COOKIE, path=COOKIE_PATH,
                               secure=request.scheme == "https", httponly=True,
                               samesite="Strict")
        return response

    # -- keys and usage (docs/accounts.md)
    def _keys_admin(self) -> tuple[Accounts | None, Response | None]:
        refused = self._admin(in_url=False)
        if refused is not None:
            return None, error_response(refused, Family.OPENAI)
        if self.accounts is None:
            return None, error_response(errors.ApiError(
                404, "named keys are not enabled here", "invalid_request_error",
                "accounts_disabled"), Family.OPENAI)
        return self.accounts, None

    async def admin_keys(self) -> Response:
        """GET: every key (never a secret); POST: a new key, its secret shown this once."""
        accounts, refusal = self._keys_admin()
        if accounts is None:
            return refusal  # type: ignore[return-value]
        if request.method == "GET":
            return json_response({"object": "list",
                                  "data": [k.as_json() for k in accounts.all_keys()]})
        try:
            body = await _admin_body()
            name = keys.check_name(body.get("name"))
            record, secret = await accounts.create(
                name, keys.limits_from(body.get("limits") or {}), keys.models_from(
                    body.get("models")))
        except keys.KeySpecError as exc:
            return error_response(errors.bad_request(str(exc), "invalid_key", exc.field),
                                  Family.OPENAI)
        except StoreUnavailable as exc:
            return error_response(_store_down(exc), Family.OPENAI)
        log.warning("admin created key %s", record.name)
        return json_response({**record.as_json(), "secret": secret}, 201)

    async def admin_key(self, name: str) -> Response:
        """GET: one key; PATCH: change its limits or models; DELETE: revoke it."""
        accounts, refusal = self._keys_admin()
        if accounts is None:
            return refusal  # type: ignore[return-value]
        record = accounts.key(name)
        if record is None:
            return error_response(errors.not_found(
                f"no key named {printable(name, 64)!r}", "key_not_found", None), Family.OPENAI)
        if request.method == "GET":
            return json_response(record.as_json())
        try:
            if request.method == "DELETE":
                record = await accounts.change(attrs.evolve(record, state=keys.KeyState.REVOKED))
                log.warning("admin revoked key %s", record.name)
                return json_response(record.as_json())
            body = await _admin_body()
            changed = attrs.evolve(record, limits=keys.limits_from(
                body.get("limits") or {}, record.limits))
            if "models" in body:
                changed = attrs.evolve(changed, models=keys.models_from(body["models"]))
            return json_response((await accounts.change(changed)).as_json())
        except keys.KeySpecError as exc:
            return error_response(errors.bad_request(str(exc), "invalid_key", exc.field),
                                  Family.OPENAI)
        except StoreUnavailable as exc:
            return error_response(_store_down(exc), Family.OPENAI)

    async def admin_usage(self) -> Response:
        """Tokens and requests by key and by provider over ``[since, until)`` (UTC
        seconds; by default the last 24 hours), from the ledger."""
        accounts, refusal = self._keys_admin()
        if accounts is None:
            return refusal  # type: ignore[return-value]
        until = _seconds(request.args.get("until"), "until", accounts.wall())
        if isinstance(until, errors.ApiError):
            return error_response(until, Family.OPENAI)
        since = _seconds(request.args.get("since"), "since", until - 86400.0)
        if isinstance(since, errors.ApiError):
            return error_response(since, Family.OPENAI)
        try:
            await accounts.flush()
            return json_response((await accounts.usage(since, until)).as_json())
        except StoreUnavailable as exc:
            return error_response(_store_down(exc), Family.OPENAI)

    async def admin_providers(self) -> Response:
        refused = self._admin()
        if refused is not None:
            return error_response(refused, Family.OPENAI)
        return json_response((await self.registry.snapshot()).as_json())

    async def admin_unpin(self, provider_id: str) -> Response:
        """Forget the key an explicit provider id was pinned to (a provider changing keys)."""
        refused = self._admin(in_url=False)
        if refused is not None:
            return error_response(refused, Family.OPENAI)
        outcome = self.identities.unpin(provider_id)
        if self.pins is not None and outcome is not Unpin.CONFIGURED:
            try:  # the fleet-wide pin is the one that counts
                removed = await self.pins.remove_pin(provider_id)
                # A registration during that wait may have adopted the old pin again.
                self.identities.unpin(provider_id)
            except PinStoreUnavailable:
                return error_response(errors.ApiError(
                    503, "the identity store is unavailable; try again",
                    "server_error", "store_unavailable"), Family.OPENAI)
            outcome = Unpin.REMOVED if removed else Unpin.NOT_PINNED
        match outcome:
            case Unpin.REMOVED:
                log.warning("admin removed the key pin of provider %s", printable(provider_id))
                return json_response({"provider_id": provider_id, "pin": "removed"})
            case Unpin.NOT_PINNED:
                return error_response(errors.not_found(
                    f"provider id {provider_id} is not pinned", "not_pinned", None),
                    Family.OPENAI)
            case Unpin.CONFIGURED:
                return error_response(errors.ApiError(
                    409, f"provider id {provider_id} is bound in the configuration "
                    "(provider_bindings); change it there", "invalid_request_error",
                    "configured_binding"), Family.OPENAI)


def _log_inband(provider_id: str, error: InBandError) -> None:
    """An in-band error: its reason and status; its text only at DEBUG, escaped and cut.

    A provider's error text may quote the prompt (docs/operations.md, logs)."""
    provider = printable(provider_id)  # a peer instance's provider, too
    log.warning("in-band error after content on %s: %s (status %d)", provider, error.reason.value,
                error.status)
    log.debug("in-band error text from %s: %s", provider, printable(error.message))


async def _read_body(limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise errors.too_large(limit)
    try:
        raw = await request.get_data(cache=False, as_text=False)
    except HTTPException as exc:
        if exc.code == 413:
            raise errors.too_large(limit) from None
        if exc.code == 408:  # the body did not arrive within quart's BODY_TIMEOUT
            raise errors.ApiError(408, "the request body did not arrive in time",
                                  "invalid_request_error", "request_timeout") from None
        raise errors.bad_request(f"could not read the request body: {exc.description}") from None
    if isinstance(raw, str):
        raw = raw.encode()
    if len(raw) > limit:
        raise errors.too_large(limit)
    return raw


# The sign-in form's body: one field holding a key.
STATUS_FORM_BYTES = 4096
# What the status page's answers carry: never cached, never framed, no scripts, forms
# post only here, no referrer leaves with a link.
_STATUS_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _html(page: str, status: int = 200) -> Response:
    return Response(page, status, dict(_STATUS_HEADERS), content_type="text/html; charset=utf-8")


def _see_status() -> Response:
    """303 to the page: the browser follows with a GET, so a reload does not post again."""
    return Response("", 303, {**_STATUS_HEADERS, "Location": "/status"})


def _model_entry(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "coordinator"}


def _offered_key() -> str:
    """The key a request offers: ``Authorization: Bearer`` (OpenAI) or ``x-api-key``."""
    offered = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        offered = auth[7:].strip()
    return offered


ADMIN_BODY_BYTES = 64 * 1024


async def _admin_body() -> dict[str, Any]:
    """An admin request's JSON object (bounded); KeySpecError when it is not one."""
    raw = await _read_body(ADMIN_BODY_BYTES)
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise keys.KeySpecError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise keys.KeySpecError("the body is not a JSON object")
    return body


def _seconds(text: str | None, name: str, default: float) -> float | errors.ApiError:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value < 1e11:
        return errors.bad_request(f"{name} is a time in seconds since 1970 (UTC)",
                                  "invalid_value", name)
    return value


def _store_down(exc: StoreUnavailable) -> errors.ApiError:
    return errors.ApiError(503, f"the keys database is unavailable ({exc}); try again",
                           "server_error", "accounts_unavailable", retry_after=5)


def _refusal_label(refused: Refused) -> str:
    if refused.unavailable:
        return "unavailable"
    if refused.model_not_allowed:
        return "model"
    assert refused.throttled is not None
    return refused.throttled.refusal.value


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")


def error_response(error: errors.ApiError, family: Family) -> Response:
    status, headers, body = render(error, family)
    return Response(body, status, headers)


def routing_error(exc: HTTPException, method: str, path: str) -> errors.ApiError:
    """An HTTP error raised by the routing or quart, in the API's terms: an unknown path
    is OpenAI's ``Invalid URL``, a known path asked with the wrong method names the right
    one (not werkzeug's sentences about spelling)."""
    shown = f"{method} {path[:200]}"
    if isinstance(exc, NotFound):
        return errors.ApiError(404, f"Invalid URL ({shown}): no such endpoint",
                               "invalid_request_error", "unknown_url")
    if isinstance(exc, MethodNotAllowed):
        methods = set(exc.valid_methods or ()) - {"HEAD", "OPTIONS"}  # quart adds both
        allowed = " or ".join(sorted(methods))
        return errors.ApiError(405, f"Method not allowed ({shown}): use {allowed}",
                               "invalid_request_error", "method_not_allowed")
    status = exc.code or 500
    kinds = {400: "bad_request", 413: "request_too_large"}
    return errors.ApiError(status, exc.description or exc.name, "invalid_request_error",
                           kinds.get(status, "http_error"))


def create_app(api: Api) -> QuartTrio:
    app = QuartTrio(__name__)
    # Streams may legitimately run for the whole inference budget; the
    # dispatcher's idle timeout bounds them, not Quart's 60 s default.
    app.config.update(
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=60,
        MAX_CONTENT_LENGTH=api.config.max_body_bytes,
    )

    def route(endpoint: Endpoint) -> Callable[[], Awaitable[Response]]:
        async def handler() -> Response:
            return await api.inference(endpoint)

        handler.__name__ = f"inference_{endpoint.name.lower()}"
        return handler

    for endpoint in Endpoint:
        app.add_url_rule(endpoint.value, view_func=route(endpoint), methods=["POST"])
    app.add_url_rule("/v1/models", view_func=api.models, methods=["GET"])
    # Model ids may hold slashes ("org/name"): the rest of the path is the id.
    app.add_url_rule("/v1/models/<path:model_id>", view_func=api.model, methods=["GET"])
    app.add_url_rule("/healthz", view_func=api.healthz, methods=["GET"])
    app.add_url_rule("/metrics", view_func=api.metrics_page, methods=["GET"])
    app.add_url_rule("/v1/admin/providers", view_func=api.admin_providers, methods=["GET"])
    app.add_url_rule("/v1/admin/keys", view_func=api.admin_keys, methods=["GET", "POST"])
    app.add_url_rule("/v1/admin/keys/<name>", view_func=api.admin_key,
                     methods=["GET", "PATCH", "DELETE"])
    app.add_url_rule("/v1/admin/usage", view_func=api.admin_usage, methods=["GET"])
    app.add_url_rule("/v1/admin/providers/<provider_id>/pin", view_func=api.admin_unpin,
                     methods=["DELETE"])
    app.add_url_rule("/status", view_func=api.status_page, methods=["GET"])
    app.add_url_rule("/status/login", view_func=api.status_login, methods=["POST"])
    app.add_url_rule("/status/logout", view_func=api.status_logout, methods=["POST"])

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        response = error_response(routing_error(exc, request.method, request.path),
                                  family_of(request.path))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(errors.ApiError)
    async def api_error(exc: errors.ApiError) -> Response:
        # A route's refusal raised from a helper (a body too large, say): its own answer.
        return error_response(exc, family_of(request.path))

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(errors.ApiError(500, "internal error", "server_error",
                                              "internal_error"), family_of(request.path))

    return app
