"""The device side: an emulated ESP32 (flash, identity, timings) running the reference
manufacturing firmware. It is the executable specification of what real firmware does.

It never imports ``stampline.station`` or ``stampline.pki``: the serial line is the only thing
it shares with the station.
"""
