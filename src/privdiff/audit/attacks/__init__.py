"""Membership attacks behind one interface, registered in `ATTACKS` under their CLI names; importing
this package registers every one of them."""

from privdiff.audit.attacks.base import (
           ATTACKS,
           Attack,
           GridAttack,
           ShadowSet,
           register_attack,
)
from privdiff.audit.attacks.gray_box import PIA, LossThreshold, SecMIStat, SimA
from privdiff.audit.attacks.lira import LiRAOffline, LiRAOnline
from privdiff.audit.attacks.proxy import ProxyAttack

DEFAULT_ATTACKS = ("loss", "pia", "secmi", "sima", "proxy")

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "PIA", "Attack", "GridAttack", "LiRAOffline", "LiRAOnline", "LossThreshold",
           "ProxyAttack", "SecMIStat", "ShadowSet", "SimA", "register_attack"]
