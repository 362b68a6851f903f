// swift-tools-version:6.1
import PackageDescription

let defaultSwiftSettings: [SwiftSetting] = [
  .swiftLanguageMode(.v6),
  .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
  name: "grpc-web-proxy",
  platforms: [.macOS(.v15)],
  products: [
    .executable(name: "grpc-web-proxy", targets: ["grpc-web-proxy"]),
    .executable(name: "user-service", targets: ["user-service"]),
    .executable(name: "bench-backend", targets: ["bench-backend"]),
  ],
  dependencies: [
    .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
    .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
    .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
    .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
    .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
    .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
    .package(url: "https://github.com/grpc/grpc-swift-2.git", from: "2.4.3"),
    .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", from: "2.9.2"),
    .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", from: "2.4.1"),
    .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
    // Tracing: the OTLP/gRPC exporter only (no OTLP/HTTP, which would pull in async-http-client).
    .package(url: "https://github.com/swift-otel/swift-otel.git", from: "1.6.0", traits: ["OTLPGRPC"]),
    .package(url: "https://github.com/apple/swift-distributed-tracing.git", from: "1.7.3"),
  ],
  targets: [
    // Envoy-shaped YAML to a validated configuration. Knows no sockets and no NIO.
    .target(
      name: "ProxyConfig",
      dependencies: [.product(name: "Yams", package: "Yams")],
      swiftSettings: defaultSwiftSettings
    ),
    // The gRPC-Web wire protocol: base64 and frame codecs, header translation, the response
    // translator. No sockets.
    .target(
      name: "GRPCWebCore",
      dependencies: [
        "ProxyConfig",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    // What the HTTP filters decide, as Envoy's filters do: routing, CORS, header mutations,
    // deadlines, the retry policy. Beside the wire code, with no sockets.
    .target(
      name: "ProxyFilters",
      dependencies: [
        "ProxyConfig",
        "GRPCWebCore",
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    // nghttp2 (Debian's libnghttp2-dev), the HTTP/2 codec on the upstream side.
    .systemLibrary(
      name: "CNGHTTP2",
      pkgConfig: "libnghttp2",
      providers: [.apt(["libnghttp2-dev"])]
    ),
    // The I/O layer: listeners, per-request handlers, upstream HTTP/2 pools, discovery.
    .target(
      name: "GRPCWebProxy",
      dependencies: [
        "GRPCWebCore",
        "ProxyFilters",
        "ProxyConfig",
        "CNGHTTP2",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "NIOHTTP1", package: "swift-nio"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        .product(name: "NIOSSL", package: "swift-nio-ssl"),
        .product(name: "NIOTLS", package: "swift-nio"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        .product(name: "OTel", package: "swift-otel"),
        .product(name: "Tracing", package: "swift-distributed-tracing"),
        .product(name: "Instrumentation", package: "swift-distributed-tracing"),
      ],
      // Release builds leave out the run-time exclusivity checks of this module's class
      // properties: on the call path they cost 9 % of a unary call's instructions and 12 % of a
      // streamed message's (`scripts/count-per-call h2` 197,464 → 179,614, `stream` 6,834 →
      // 6,035 a message). Everything here runs on one event loop per object; debug builds,
      // which every test runs, keep the checks and trap on a violation.
      swiftSettings: defaultSwiftSettings + [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
    ),
    // The demo.User example backend (login/logout) and a test service.
    .target(
      name: "UserService",
      dependencies: [
        .product(name: "GRPCCore", package: "grpc-swift-2"),
        .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
        .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .executableTarget(
      name: "grpc-web-proxy",
      dependencies: [
        "GRPCWebProxy",
        "ProxyConfig",
        "UserService",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
        .product(name: "Logging", package: "swift-log"),
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .executableTarget(
      name: "user-service",
      dependencies: [
        "UserService",
        .product(name: "ArgumentParser", package: "swift-argument-parser"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    // A fixed-reply gRPC backend for scripts/bench.
    .executableTarget(
      name: "bench-backend",
      dependencies: [
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .testTarget(
      name: "GRPCWebCoreTests",
      dependencies: [
        "GRPCWebCore",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .testTarget(
      name: "ProxyFiltersTests",
      dependencies: [
        "ProxyFilters",
        "GRPCWebCore",
        "ProxyConfig",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .testTarget(
      name: "GRPCWebProxyTests",
      dependencies: [
        "GRPCWebProxy",
        "GRPCWebCore",
        "ProxyFilters",
        "ProxyConfig",
        .product(name: "NIOCore", package: "swift-nio"),
        .product(name: "NIOPosix", package: "swift-nio"),
        .product(name: "NIOEmbedded", package: "swift-nio"),
        .product(name: "NIOHTTP2", package: "swift-nio-http2"),
        .product(name: "NIOHPACK", package: "swift-nio-http2"),
      ],
      swiftSettings: defaultSwiftSettings
    ),
    .testTarget(
      name: "ProxyConfigTests",
      dependencies: ["ProxyConfig", .product(name: "Yams", package: "Yams")],
      swiftSettings: defaultSwiftSettings
    ),
  ]
)
