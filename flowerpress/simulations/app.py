"""The ClientApp of simulated federations: flowerpress's app plus simulated attacks.

``flowerpress simulate`` runs this app on Flower's simulation engine; it is
:func:`flowerpress.client_app` with the run config's ``attack`` wrapped
around the task (:class:`~flowerpress.simulations.attacks.AttackedTask`).
Devices run :mod:`flowerpress.client.app`, which never attacks.
"""

from __future__ import annotations

from flowerpress.client.app import client_app
from flowerpress.simulations.attacks import with_attack

app = client_app(wrap=with_attack)
