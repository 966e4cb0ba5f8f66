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
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import h11
import quart.wrappers.base
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from coordinator import errors, sizes
from coordinator.config import Config
from coordinator.credentials import matches_any
from coordinator.dispatch.attempt import Dispatcher
from coordinator.dispatch.items import End, InBandError
from coordinator.dispatch.relay import Relay
from coordinator.dispatch.request import Committed, NotDispatched, RequestContext
from coordinator.dispatch.timing import Timing
from coordinator.lifecycle import Drain
from coordinator.metrics import Metrics
from coordinator.protocol.endpoints import Endpoint, inner_request
from coordinator.providers.identity import IdentityBook, PinStoreUnavailable, SharedPins, Unpin
from coordinator.registry.actor import RegistryClient, RegistryFault
from coordinator.registry.table import Job
from coordinator.registry.traits import estimate_prompt_tokens, traits_of
from coordinator.toolschema import normalize_tool_schemas
from coordinator.untrusted import printable

from . import sse
from .assemble import assemble
from .errors import Family, error_body, error_headers, error_json, family_of
from .outcomes import collect, refusal_error
from .requests import ParsedRequest, parse_body, validate
from .server import ConnectionTable, FramingRefused, GuardedStream
from .status import group_failovers, render_sign_in, render_status
from .status_sessions import COOKIE, COOKIE_PATH, StatusSessions

log = logging.getLogger(__name__)
outcomes = logging.getLogger("coordinator.requests")

# quart 0.23 (with quart-trio 0.13, Python >= 3.13) raises this when the consumer
# hangs up before the response's first write; quart 0.22 has no such error.
_gone = getattr(quart.wrappers.base, "ClientDisconnectedError", None)
_CONSUMER_GONE: tuple[type[Exception], ...] = (_gone,) if _gone is not None else ()

# The request's relays (its committed winners), which EdgeGuard closes when the request
# is over if their streams have not: the request owns its winner however it ends.
RELAYS_KEY = "coordinator.request_relays"
# Bodies larger than this are parsed in a worker thread (Api._prepare).
PARSE_IN_THREAD_BYTES = 256 * 1024
# The request's _BodyWatch, which a stream tells when its last part comes.
WRITES_KEY = "coordinator.response_writes"


class ConsumerStalled(Exception):
    """An HTTP/2 consumer gave its stream no flow-control window for ``write_timeout``."""


@attrs.define(eq=False)
class Api:
    config: Config
    registry: RegistryClient
    dispatcher: Dispatcher
    metrics: Metrics
    identities: IdentityBook = attrs.field(factory=IdentityBook)
    drain: Drain = attrs.field(factory=Drain)
    shared: Any = None  # cluster/shared.py: its status shows on /healthz and /status
    pins: SharedPins | None = None  # with several instances: the fleet-wide pins
    status_sessions: StatusSessions = attrs.field(factory=StatusSessions)  # browsers on /status
    _parse_threads: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(1), init=False)

    # -- auth
    def _authorized(self, keys: tuple[str, ...]) -> bool:
        # An empty key list authorizes nobody; `coordinator serve` generates a key.
        offered = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            offered = auth[7:].strip()
        return matches_any(offered, keys)

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
        family = Family.ANTHROPIC if endpoint is Endpoint.MESSAGES else Family.OPENAI
        timing = Timing(started=trio.current_time())
        request_id = uuid.uuid4().hex[:16]
        record: dict[str, Any] = {"request_id": request_id, "route": endpoint.value}
        try:
            response = await self._inference(endpoint, timing, request_id, record)
        except errors.ApiError as exc:
            record.update(result="error", status=exc.status, error=exc.code or exc.type)
            response = error_response(exc, family)
        except RegistryFault:
            # The actor has logged the fault; this request gets a clean 500.
            record.update(result="error", status=500, error="internal_error")
            response = error_response(errors.ApiError(
                500, "internal error", "server_error", "internal_error"), family)
        finally:
            # A stream's outcome is known only when it ends: the relay logs it then.
            if record.get("result") != "streaming":
                _log_outcome(record, timing)
        self.metrics.requests.labels(endpoint.value, str(response.status_code)).inc()
        return response

    async def _inference(
        self, endpoint: Endpoint, timing: Timing, request_id: str, record: dict[str, Any]
    ) -> Response:
        if not self._authorized(self.config.api_keys):
            raise errors.unauthorized()
        raw = await _read_body(self.config.max_body_bytes)
        if len(raw) > PARSE_IN_THREAD_BYTES:
            # Seconds of pure Python for a large body of an odd shape: in a worker
            # thread, the event loop (every other request) keeps its turns.
            # One such thread at a time: under the GIL more would only take more turns
            # from the event loop, not finish sooner.
            parsed, plaintext, job = await trio.to_thread.run_sync(
                self._prepare, endpoint, raw, request_id, limiter=self._parse_threads)
        else:
            parsed, plaintext, job = self._prepare(endpoint, raw, request_id)
        record["model"] = parsed.model
        ctx = RequestContext(job, endpoint, plaintext, parsed.stream, timing)
        timing.parse = trio.current_time() - timing.started
        relay = await self._dispatch(ctx, record)
        committed = relay.committed
        record["provider"] = committed.racer.lease.provider_id
        headers = {
            "X-Provider-Id": committed.racer.lease.provider_id,
            "X-Provider-Version": committed.racer.lease.version,
            "X-Attempts": str(committed.attempts),
            "X-Timing": timing.header(),
            "X-Request-Id": request_id,
        }
        instance = committed.racer.connection.instance if committed.racer.connection else ""
        if instance:  # a provider connected to another instance (docs/scale-out.md)
            headers["X-Provider-Instance"] = instance
            record["instance"] = instance
        if not parsed.stream:
            chunks, usage = await collect(relay, self.metrics, self.config.max_response_bytes)
            record.update(result="success", status=200)
            body = assemble(endpoint, chunks, usage, request_id)
            return Response(json.dumps(body), 200, headers, content_type="application/json")
        record.update(result="streaming", status=200)
        response = Response(
            self._sse(endpoint, relay, record, timing, _writes_of(request.scope)),
            200,
            {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            content_type="text/event-stream",
        )
        response.timeout = None
        return response

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

    async def _dispatch(self, ctx: RequestContext, record: dict[str, Any]) -> Relay:
        """Dispatch; the winner's relay is made at the commit, and owned by the request."""
        owned: list[Relay] = request.scope[RELAYS_KEY]  # type: ignore[literal-required]

        def handover(winner: Committed) -> None:
            owned.append(Relay(self.dispatcher, winner))

        committed: Committed | None = None
        try:
            # Waiting for a provider (queue, attempts) ends with the drain, if one begins.
            with self.drain.bounded():
                committed = await self.dispatcher.dispatch(ctx, handover)
        except NotDispatched as exc:
            raise refusal_error(exc.refused) from None
        finally:
            record.update(attempts=ctx.attempts, providers_tried=ctx.providers_tried)
        if committed is None:
            raise errors.shutting_down()
        return owned[-1]

    async def _sse(
        self, endpoint: Endpoint, relay: Relay, record: dict[str, Any], timing: Timing,
        writes: _BodyWatch | None = None,
    ) -> AsyncIterator[bytes]:
        """The stream's SSE bytes, a batch per write (``writes``: the request's _BodyWatch)."""
        writer = sse.SseWriter(endpoint)
        committed = relay.committed
        record["result"] = "client_gone"
        try:
            async with contextlib.aclosing(relay.batches()) as batches:
                async for batch in batches:
                    last = False  # an ending: nothing comes after this batch
                    for item in batch:
                        if isinstance(item, InBandError):
                            self.metrics.inband_errors.labels(item.reason).inc()
                            _log_inband(committed.racer.lease.provider_id, item)
                            record.update(result="inband_error", error=item.reason)
                            last = True
                        elif isinstance(item, End):
                            record["result"] = "success"
                            last = True
                    data = b"".join(writer.frame(item) for item in batch)
                    if data:
                        if last and writes is not None:  # out with the end, at once
                            writes.last_part_next()
                        yield data
                    if last:
                        return
        finally:
            if writes is not None:  # once the server has (or has not) sent the end
                writes.pending_log = (record, timing)
            else:
                _log_outcome(record, timing)

    # -- the rest of the surface
    async def models(self) -> Response:
        if not self._authorized(self.config.api_keys):
            return error_response(errors.unauthorized(), Family.OPENAI)
        # Read, not asked: a health check or a model list must not cost a full snapshot
        # of a 10,000-provider table (the actor is the only writer; reading is safe).
        served = self.registry.state.models_served()
        return json_response({"object": "list", "data": [_model_entry(m) for m in served]})

    async def model(self, model_id: str) -> Response:
        """``models.retrieve``: one model some connected provider serves now, as listed."""
        if not self._authorized(self.config.api_keys):
            return error_response(errors.unauthorized(), Family.OPENAI)
        if not self.registry.state.serves(model_id):
            return error_response(errors.not_found(
                f"the model {model_id[:256]!r} does not exist or is not served"), Family.OPENAI)
        return json_response(_model_entry(model_id))

    async def healthz(self) -> Response:
        providers, queued = self.registry.state.counts()
        draining = self.drain.draining
        return json_response({"status": "draining" if draining else "ok",
                              "providers": providers, "queue_depth": queued,
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
                             self._cluster(), signed_in=signed_in)
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
    log.warning("in-band error after content on %s: %s (status %d)", provider, error.reason,
                error.status)
    log.debug("in-band error text from %s: %s", provider, printable(error.message))


def _log_outcome(record: dict[str, Any], timing: Timing) -> None:
    """One JSON line per request outcome. Never any prompt or output content."""
    if not outcomes.isEnabledFor(logging.INFO):
        return  # the usual production level: no line, so no encoding either
    record["latency_ms"] = round((trio.current_time() - timing.started) * 1000, 3)
    record.setdefault("result", "cancelled")
    outcomes.info(json.dumps(record))


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


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")


def error_response(error: errors.ApiError, family: Family) -> Response:
    return Response(json.dumps(error_body(error, family)), error.status, error_headers(error))


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

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(errors.ApiError(500, "internal error", "server_error",
                                              "internal_error"), family_of(request.path))

    return app


class EdgeGuard:
    """ASGI wrapper around the application: what every request gets, whatever its route.

    * Each request owns the relay of its committed winner, however the
      response ends — read to the end, abandoned between the headers and the
      body, or cut by the write timeout: once the application is done, a
      winner its stream has not released is released here.
    * The response head waits for the first body part, and a stream's last
      part for the end, so that each pair leaves in one write (``_BodyWatch``).
    * The connection table hears when a request starts and ends, so the
      keep-alive idle timeout applies only between requests.
    * WebSocket upgrades are refused (403): the API has none; providers use
      their own port.
    * While the coordinator drains, new requests get 503 with ``Retry-After``
      (``/healthz`` says "draining", ``/metrics`` still answers), every
      response closes its connection, and requests in flight are counted so
      the drain knows when they are all done.
    """

    def __init__(self, app: QuartTrio, connections: ConnectionTable | None = None,
                 drain: Drain | None = None) -> None:
        self.app: Any = app
        self.connections = connections
        self.drain = drain if drain is not None else Drain()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope.get("type")
        if kind == "websocket":
            try:
                await send({"type": "websocket.close", "code": 1008})
            except h11.LocalProtocolError:
                # The peer broke HTTP/1 framing after the upgrade request (hypercorn's
                # h11 is in its ERROR state): there is no one to refuse any more.
                log.debug("websocket upgrade refused on a broken connection")
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        peer = _peer(scope)
        if self.connections is not None:
            self.connections.request_started(peer)
        stream = self.connections.stream(peer) if self.connections is not None else None
        has_body = _has_body(scope)
        if stream is not None and has_body:
            receive = stream.guard_body(receive)  # a body the listener refuses fails here
        body = _BodyWatch(receive, send, has_body, self.drain, stream,
                          _stall_limit(scope, stream), closing=_asks_to_close(scope))
        scope[WRITES_KEY] = body
        try:
            with self.drain.request():
                if self.drain.draining and scope.get("path") not in _WHILE_DRAINING:
                    await body.error(errors.shutting_down(), scope)
                elif _both_lengths(scope):
                    await body.error(_BOTH_LENGTHS, scope)  # and closed: never read
                else:
                    relays: list[Relay] = []
                    scope[RELAYS_KEY] = relays
                    stalled = False
                    try:
                        stalled = await _isolated(self.app, scope, body)
                    finally:
                        for relay in relays:  # a stream nobody read to its end
                            await relay.abandon()
                        body.log_outcome(stalled=stalled)
        finally:
            if self.connections is not None:
                self.connections.request_ended(peer, close=body.closing)


async def _isolated(app: Any, scope: dict[str, Any], body: _BodyWatch) -> bool:
    """Run the application; what escapes it becomes an error response, not a crash.

    Quart raises some HTTP errors outside its handlers (werkzeug's ``BadHost``
    for a Host header that does not encode); they get their own status. A
    consumer that left is not an error: quart 0.23 raises
    ``ClientDisconnectedError`` when the hang-up lands between the handler's
    return and the response's first write, and there is no one to answer.
    Anything else is a bug: logged, and a 500 in the family's shape. Returns
    whether the consumer stalled its HTTP/2 stream (and was cut).
    """
    stalled = False
    try:
        await app(scope, body.receive, body.send)
    except* _CONSUMER_GONE:
        log.debug("consumer left before its answer was sent")
    except* ConsumerStalled as group:
        log.info("%s; its stream is cut", group.exceptions[0])
        stalled = True
    except* FramingRefused as group:
        refused = group.exceptions[0]
        assert isinstance(refused, FramingRefused)
        log.info("request body refused by the listener: %s", refused.error.message)
        await body.error(refused.error, scope)
    except* HTTPException as group:
        exc = group.exceptions[0]
        assert isinstance(exc, HTTPException)
        log.warning("request refused outside the routes: %s", printable(exc.description))
        await body.error(errors.ApiError(exc.code or 400, exc.description or exc.name,
                                         "invalid_request_error", "bad_request"), scope)
    except* Exception:
        log.error("unhandled error in the application", exc_info=True)
        await body.error(errors.ApiError(500, "internal error", "server_error",
                                         "internal_error"), scope)
    return stalled


class _BodyWatch:
    """The request's ASGI messages on their way between hypercorn and the application.

    * Closes the connection after a response that was sent before the request
      body was read. An early answer (401 before the body is read, 413 from
      Content-Length) leaves the unread body on the connection; hypercorn 0.18
      then sometimes leaves the connection hanging, so the client's next request
      on it is never answered. ``Connection: close`` makes the client open a
      fresh connection instead, and the listener (``server.GuardedStream``)
      closes this one once the request ends.
    * Holds the response head until the first body part, and a stream's last
      part (:meth:`last_part_next`) until the end, and has the stream write each
      group as one: a write fewer each, and the head never travels alone ahead
      of the first content.
    """

    def __init__(self, receive: Any, send: Any, has_body: bool, drain: Drain,
                 stream: GuardedStream | None = None, stall_limit: float | None = None, *,
                 closing: bool = False) -> None:
        self._receive = receive
        self._send = send
        self._stall_limit = stall_limit
        self._drain = drain
        self._stream = stream
        self._held: list[dict[str, Any]] = []
        self._last_next = False
        self.body_read = not has_body
        # A client that asked for the connection to close (it would otherwise wait
        # keep_alive_timeout for it), or, once the response starts, an early answer.
        self.closing = closing
        self.started = False
        self.finished = False  # the response's last part was handed to the server
        # A stream's outcome, logged once the response is over (what the consumer got:
        # an answer the server never sent is not a success).
        self.pending_log: tuple[dict[str, Any], Timing] | None = None

    def log_outcome(self, *, stalled: bool) -> None:
        """Log the stream's outcome, corrected by what became of its last part."""
        if self.pending_log is None:
            return
        record, timing = self.pending_log
        self.pending_log = None
        if stalled:
            record["result"] = "consumer_stalled"  # whatever it had got to: it was cut
        elif not self.finished and record.get("result") == "success":
            record["result"] = "client_gone"
        _log_outcome(record, timing)

    def last_part_next(self) -> None:
        """The next body part is the last before the end: hold it for the end's write."""
        self._last_next = True

    async def receive(self) -> dict[str, Any]:
        message: dict[str, Any] = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_read = True
        return message

    async def error(self, error: errors.ApiError, scope: dict[str, Any]) -> None:
        """Answer with ``error``, unless the response has already begun."""
        if self.started:
            return
        family = family_of(str(scope.get("path", "")))
        headers = [(k.lower().encode(), v.encode()) for k, v in error_headers(error).items()]
        await self.send({"type": "http.response.start", "status": error.status,
                         "headers": headers})
        await self.send({"type": "http.response.body", "body": error_json(error, family).encode()})

    async def send(self, message: dict[str, Any]) -> None:
        if self._stall_limit is None:
            return await self._pass(message)
        with trio.move_on_after(self._stall_limit) as stalled:
            await self._pass(message)
        if stalled.cancelled_caught:
            raise ConsumerStalled(f"consumer gave its HTTP/2 stream no window for "
                                  f"{self._stall_limit:g}s")

    async def _pass(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_read or self._drain.draining:
                self.closing = True
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"connection", b"close")]}
            if self._stream is not None:  # it goes out with the first body part
                self._held.append(message)
                return
        elif (message["type"] == "http.response.body" and self._last_next
              and message.get("more_body", False) and self._stream is not None):
            self._last_next = False
            self._held.append(message)
            return
        if self._held:
            await self._send_with_held(message)
        else:
            await self._send_one(message)

    async def _send_one(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.start":
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Handed over: HTTP/1 writes it whole or not at all, and a consumer that
                # closes as soon as it has read it may cancel the rest of the call.
                self.finished = True
            await self._send(message)
            return
        # A head, once begun, is finished: over HTTP/2 hypercorn encodes it into the
        # connection's shared header table before it waits for the connection's writer,
        # and a head cut on its way leaves the consumer's decoder out of step for every
        # later answer on the connection. It waits on no flow-control window, only on
        # that writer, whose every write is bounded by write_timeout.
        with trio.CancelScope(shield=True):
            await self._send(message)

    async def _send_with_held(self, message: dict[str, Any]) -> None:
        """The held messages, then ``message``: hypercorn writes each, the stream sends one."""
        assert self._stream is not None
        held, self._held = self._held, []
        self._stream.holding = True
        try:
            for earlier in held:
                await self._send_one(earlier)
        finally:
            self._stream.holding = False
        try:
            await self._send_one(message)
        finally:
            # Nothing stays held: not when hypercorn wrote nothing for ``message`` (an
            # empty part), nor when its write never came (cancelled on the way).
            with trio.CancelScope(shield=True):
                await self._stream.flush()


_WHILE_DRAINING = frozenset({"/healthz", "/metrics"})


def _writes_of(scope: Any) -> _BodyWatch | None:
    """The request's _BodyWatch (absent when the app is driven without EdgeGuard)."""
    writes = scope.get(WRITES_KEY)
    return writes if isinstance(writes, _BodyWatch) else None


def _has_body(scope: dict[str, Any]) -> bool:
    """Whether an HTTP/1 request's framing announces a body (HTTP/2 needs no help here)."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    for name, value in scope.get("headers", ()):
        if name.lower() == b"transfer-encoding":
            return True
        if name.lower() == b"content-length":
            return bool(value.strip() != b"0")
    return False


def _asks_to_close(scope: dict[str, Any]) -> bool:
    """HTTP/1.1 with ``Connection: close``, or any HTTP/1.0 request.

    HTTP/1.0 even with ``Connection: keep-alive``: hypercorn's h11 keeps no HTTP/1.0
    connection alive (its answer says ``Connection: close``), so waiting
    ``keep_alive_timeout`` for another request only kept the client waiting.
    """
    version = scope.get("http_version")
    if version == "1.0":
        return True
    if version != "1.1":
        return False
    return any(token.strip().lower() == b"close" for name, value in scope.get("headers", ())
               if name.lower() == b"connection" for token in value.split(b","))


# RFC 9112 §6.3: a request with both may be a smuggling attempt (a proxy in front may
# have framed it by the other header); refused, and its connection closed.
_BOTH_LENGTHS = errors.bad_request(
    "a request may not carry both Content-Length and Transfer-Encoding", "bad_request")


def _both_lengths(scope: dict[str, Any]) -> bool:
    """An HTTP/1 request framed both by ``Content-Length`` and ``Transfer-Encoding``."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    names = {name.lower() for name, _ in scope.get("headers", ())}
    return b"content-length" in names and b"transfer-encoding" in names


def _stall_limit(scope: dict[str, Any], stream: GuardedStream | None) -> float | None:
    """How long an HTTP/2 response may wait on the consumer's flow control.

    Over HTTP/1 a consumer that stops reading blocks a socket write, which the listener
    bounds (``write_timeout``). Over HTTP/2 hypercorn waits for the stream's window
    without writing: with no bound, one consumer advertising a window of 0 held each
    connection (and its handler) for good, and ``max_connections`` of them locked
    everyone out.
    """
    if scope.get("http_version") != "2" or stream is None:
        return None
    return stream.write_timeout


def _peer(scope: dict[str, Any]) -> tuple[str, int] | None:
    client = scope.get("client")
    if isinstance(client, list | tuple) and len(client) == 2:
        return (str(client[0]), int(client[1]))
    return None
