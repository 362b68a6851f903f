// nghttp2, Debian's libnghttp2-dev: the HTTP/2 codec of the proxy's upstream connections.
#include <nghttp2/nghttp2.h>
