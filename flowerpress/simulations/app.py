"""The ClientApp of simulated federations: flowerpress's app plus simulated attacks.

``flowerpress simulate`` runs this app on Flower's simulation engine; it is
:func:`flowerpress.client_app` with the run config's ``attack`` wrapped
around the task (:class:`~flowerpress.simulations.attacks.AttackedTask`).
Simulated nodes accept ``rng=seeded`` DP noise (:func:`simulated_node_mod`).
Devices run :mod:`flowerpress.client.app`, which never attacks.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from flowerpress.client.app import client_app
from flowerpress.simulations.attacks import with_attack


def simulated_node_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mark a simulated node: it accepts ``rng=seeded`` DP noise (reproducible runs).

    A simulation is the operator's own experiment, not a device protecting its
    data: seeded noise is allowed there (and reported with an infinite epsilon
    and its nominal value), while a device must opt in with ``dp-allow-seeded``.
    """
    context.node_config.setdefault("dp-allow-seeded", True)
    return call_next(msg, context)


app = client_app(wrap=with_attack, outer_mods=[simulated_node_mod])
