SELECT flowfabric.ff_lane_channel('x');
