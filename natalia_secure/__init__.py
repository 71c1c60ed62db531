"""natalia-secure: a WhatsApp assistant daemon whose conversations are sealed at rest."""

from __future__ import annotations

__version__ = "0.1.0"
