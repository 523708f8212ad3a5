"""Model-card templates for chase_timm.save_pretrained (installed as the ``chase_timm.hub_cards`` package)."""
