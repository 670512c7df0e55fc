"""Membership attacks behind one interface; `ATTACKS` maps a name to its class."""

from privdiff.audit.attacks.base import ATTACKS, Attack, GridAttack, register_attack
from privdiff.audit.attacks.gray_box import PIA, LossThreshold, SecMIStat, SimA
from privdiff.audit.attacks.lira import LiRAOffline, LiRAOnline, ShadowSet
from privdiff.audit.attacks.proxy import ProxyAttack

DEFAULT_ATTACKS = ("loss", "pia", "secmi", "sima", "proxy")
SHADOW_ATTACKS = {"lira-online": LiRAOnline, "lira-offline": LiRAOffline}

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "PIA", "SHADOW_ATTACKS", "Attack", "GridAttack", "LiRAOffline",
           "LiRAOnline", "LossThreshold", "ProxyAttack", "SecMIStat", "ShadowSet", "SimA", "register_attack"]
