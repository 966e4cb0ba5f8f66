"""The provider side of the coordinator's protocol, shared by every provider.

One piece, used by the simulator (``provider_sim``: this client with scripted
backends) and meant for the provider agent (``provider_agent``: this client in front
of a real inference engine):

* :mod:`.keys` — a provider's Ed25519 and X25519 keys, kept in a key file;
* :mod:`.client` — one connection: register, answer challenges, heartbeat,
  decrypt each request, hand it to :meth:`~.client.ProviderClient.answer`, seal and
  send what it answers, cancel it when told;
* :mod:`.connect` — stay connected to one of several coordinator URLs, with
  backoff and jitter;
* :mod:`.actions` — what a backend answers with;
* :mod:`.template_check` — the template-render self-check.

It imports only the coordinator's wire protocol (``coordinator.protocol``), its
WebSocket plumbing (``coordinator.wsio``) and its log escaping
(``coordinator.untrusted``).
"""
