"""Run fedseal as a real Flower federation: SuperLink, SuperNodes and ``flwr run``.

``deploy.pki`` makes the TLS certificates and SuperNode authentication keys,
``deploy.layout`` places every key where its owner reads it,
``deploy.processes`` starts and stops the daemons by PID, ``deploy.flwr_cli``
wraps the ``flwr`` commands, and ``deploy.launcher`` puts them together behind
``fedseal deploy local``.
"""
