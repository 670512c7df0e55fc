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
from privdiff.audit.attacks.quantile import QuantileRegressionAttack
from privdiff.audit.attacks.rmia import RMIAOffline, RMIAOnline

DEFAULT_ATTACKS = ("loss", "pia", "secmi", "sima", "proxy")
# No shadow training: what `privdiff check` runs unless --thorough (the proxy is left out for its
# training time; the quantile attack needs only the base model).
CHEAP_ATTACKS = ("loss", "pia", "secmi", "sima", "quantile")

__all__ = ["ATTACKS", "CHEAP_ATTACKS", "DEFAULT_ATTACKS", "PIA", "Attack", "GridAttack", "LiRAOffline",
           "LiRAOnline", "LossThreshold", "ProxyAttack", "QuantileRegressionAttack", "RMIAOffline", "RMIAOnline",
           "SecMIStat", "ShadowSet", "SimA", "register_attack"]
