"""Ready-made glue for agent frameworks (optional extras).

``prx_channel_email.integrations.nanobot`` needs ``pip install "prx-channel-email[nanobot]"``;
``prx_channel_email.integrations.hermes`` needs ``pip install "prx-channel-email[hermes]"``.
Each imports its host only inside itself, so the core package never depends on either.
"""
