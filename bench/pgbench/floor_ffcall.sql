SELECT ff_lane_channel('x');
